//! Input resolution (files, directories, globs, data-order files) and record splitting
//! (JSON arrays, JSONL; plain, `.gz`, `.zst`).
//!
//! Order is part of the output's identity, so it never depends on the filesystem: directories
//! are walked recursively and sorted by relative path bytes, globs are sorted, data-order
//! files are taken line by line. A folder written by `datasets.Dataset.save_to_disk`
//! (`state.json` beside its `data-*.arrow` files) stands for its data files in the order its
//! `state.json` lists them, wherever it is met.

use std::io::BufRead;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// File-name endings recognised as data when walking a directory.
pub const DATA_EXTENSIONS: &[&str] = &[
    ".jsonl",
    ".json",
    ".jsonl.gz",
    ".json.gz",
    ".jsonl.zst",
    ".json.zst",
    ".parquet",
    ".arrow",
    ".csv",
    ".tsv",
    ".csv.gz",
    ".tsv.gz",
    ".csv.zst",
    ".tsv.zst",
];

/// The file `datasets.Dataset.save_to_disk` writes beside its data files.
const SAVED_STATE: &str = "state.json";
/// The file `datasets.DatasetDict.save_to_disk` writes beside its split folders.
const SAVED_SPLITS: &str = "dataset_dict.json";

/// The data files of a `save_to_disk` folder, in the order its `state.json` lists them, or
/// None when `dir` is not one.
pub fn saved_dataset_files(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    let state = dir.join(SAVED_STATE);
    if dir.join(SAVED_SPLITS).is_file() {
        let text = std::fs::read_to_string(dir.join(SAVED_SPLITS)).unwrap_or_default();
        return Err(Error::NoInputs(format!(
            "{} holds a DatasetDict saved with save_to_disk ({}): give one split's folder, \
             e.g. {}",
            dir.display(),
            text.trim(),
            dir.join("train").display()
        )));
    }
    if !state.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&state).map_err(|e| Error::io(&state, e))?;
    let bad = |msg: String| Error::DataOrder {
        path: state.clone(),
        line: 1,
        msg,
    };
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("invalid JSON in a save_to_disk state file: {e}")))?;
    let Some(list) = doc.get("_data_files").and_then(|v| v.as_array()) else {
        return Ok(None); // some other state.json: an ordinary folder
    };
    let mut out = Vec::with_capacity(list.len());
    for entry in list {
        let name = entry
            .get("filename")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad(format!("_data_files entry {entry} has no \"filename\"")))?;
        let rel = Path::new(name);
        if name.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(bad(format!(
                "data file {name:?} is not a file name inside the folder"
            )));
        }
        let p = dir.join(rel);
        if !p.is_file() {
            return Err(bad(format!("lists {name:?}, which is not in the folder")));
        }
        out.push(p);
    }
    Ok(Some(out))
}

/// One input file, in the order it will be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputFile {
    /// Where to read it.
    pub path: PathBuf,
    /// Stable display name: relative to the directory or data root it came from, or the path
    /// as given. Recorded in the output's file table and fingerprint.
    pub name: String,
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn has_data_extension(name: &str, extensions: &[&str]) -> bool {
    extensions.iter().any(|e| name.ends_with(e))
}

fn rel_name(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Recursively list data files under `root`, sorted by relative path bytes. Hidden entries
/// (leading `.`) are skipped; a symlink that resolves outside `root` is refused.
pub fn walk_dir(root: &Path, extensions: &[&str]) -> Result<Vec<InputFile>> {
    let canon_root = root.canonicalize().map_err(|e| Error::io(root, e))?;
    let mut found: Vec<(Vec<u8>, InputFile)> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let dir = root.join(&rel_dir);
        if let Some(saved) = saved_dataset_files(&dir)? {
            // Sorted as the folder's own path, then in the state file's order.
            let key = rel_name(&rel_dir).into_bytes();
            for (k, path) in saved.into_iter().enumerate() {
                let rel = rel_dir.join(path.file_name().unwrap_or_default());
                if !has_data_extension(&rel.to_string_lossy(), extensions) {
                    continue;
                }
                let mut sort = key.clone();
                sort.extend_from_slice(b"/\0");
                sort.extend_from_slice(&(k as u64).to_be_bytes());
                found.push((
                    sort,
                    InputFile {
                        path,
                        name: rel_name(&rel),
                    },
                ));
            }
            continue;
        }
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let fname = entry.file_name();
            let fname_s = fname.to_string_lossy();
            if fname_s.starts_with('.') {
                continue;
            }
            let rel = rel_dir.join(&fname);
            let full = root.join(&rel);
            let ftype = entry.file_type().map_err(|e| Error::io(&full, e))?;
            let is_dir = if ftype.is_symlink() {
                let target = full.canonicalize().map_err(|e| Error::io(&full, e))?;
                if !target.starts_with(&canon_root) {
                    return Err(Error::OutsideDataRoot {
                        path: full,
                        root: root.to_path_buf(),
                        target,
                    });
                }
                target.is_dir()
            } else {
                ftype.is_dir()
            };
            if is_dir {
                stack.push(rel);
            } else if has_data_extension(&fname_s, extensions) {
                let name = rel_name(&rel);
                found.push((name.as_bytes().to_vec(), InputFile { path: full, name }));
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found.into_iter().map(|(_, f)| f).collect())
}

/// Resolve command-line inputs into an ordered file list. Files keep the order given;
/// directories expand recursively in sorted order; globs expand sorted.
pub fn resolve_inputs(inputs: &[String], extensions: &[&str]) -> Result<Vec<InputFile>> {
    if inputs.is_empty() {
        return Err(Error::NoInputs("no input paths given".into()));
    }
    let mut out = Vec::new();
    for inp in inputs {
        let p = Path::new(inp);
        if p.is_dir() {
            let files = walk_dir(p, extensions)?;
            if files.is_empty() {
                return Err(Error::NoInputs(format!(
                    "directory {inp} holds no data files (looked for {})",
                    extensions.join(", ")
                )));
            }
            out.extend(files);
        } else if p.exists() {
            out.push(InputFile {
                path: p.to_path_buf(),
                name: inp.clone(),
            });
        } else if is_glob(inp) {
            let paths = glob::glob(inp)
                .map_err(|e| Error::Config(format!("bad glob pattern {inp:?}: {e}")))?;
            let mut matched: Vec<PathBuf> = Vec::new();
            for m in paths {
                let m = m.map_err(|e| {
                    let p = e.path().to_path_buf();
                    Error::io(p, e.into())
                })?;
                if m.is_file() {
                    matched.push(m);
                }
            }
            if matched.is_empty() {
                return Err(Error::NoInputs(format!("glob {inp:?} matched no files")));
            }
            matched.sort_by(|a, b| {
                a.as_os_str()
                    .as_encoded_bytes()
                    .cmp(b.as_os_str().as_encoded_bytes())
            });
            out.extend(matched.into_iter().map(|m| InputFile {
                name: m.to_string_lossy().into_owned(),
                path: m,
            }));
        } else {
            return Err(Error::io(
                p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
    }
    Ok(out)
}

/// Read a data-order file (one path per line, relative to `root`, as XTuner's
/// `get_data_order.py` writes it). Blank lines are ignored; absolute paths, `..` and symlinks
/// leading outside `root` are refused, as are duplicates.
pub fn read_data_order(order_file: &Path, root: &Path) -> Result<Vec<InputFile>> {
    let text = std::fs::read_to_string(order_file).map_err(|e| Error::io(order_file, e))?;
    let canon_root = root.canonicalize().map_err(|e| Error::io(root, e))?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = (i + 1) as u64;
        let entry = raw.trim_end_matches('\r').trim();
        if entry.is_empty() {
            continue;
        }
        let bad = |msg: String| Error::DataOrder {
            path: order_file.to_path_buf(),
            line,
            msg,
        };
        let rel = Path::new(entry);
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(bad(format!(
                "{entry:?} is not a relative path inside the data root {}",
                root.display()
            )));
        }
        let full = root.join(rel);
        let canon = full
            .canonicalize()
            .map_err(|e| bad(format!("{}: {e}", full.display())))?;
        if !canon.starts_with(&canon_root) {
            return Err(bad(format!(
                "{entry:?} resolves outside the data root {} (to {})",
                root.display(),
                canon.display()
            )));
        }
        if !canon.is_file() {
            return Err(bad(format!("{} is not a file", full.display())));
        }
        let name = rel_name(rel);
        if !seen.insert(name.clone()) {
            return Err(bad(format!("{entry:?} is listed twice")));
        }
        out.push(InputFile { path: full, name });
    }
    if out.is_empty() {
        return Err(Error::NoInputs(format!(
            "data-order file {} lists no files",
            order_file.display()
        )));
    }
    Ok(out)
}

/// One record's JSON text and where it came from.
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    /// 0-based index of the record in its file.
    pub index: u64,
    /// 1-based line where the record starts.
    pub line: u64,
    /// The record's JSON text.
    pub text: &'a str,
}

/// One element of a top-level JSON array, as [`ArrayElements`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArrayElement {
    /// 0-based index of the element in the array.
    pub index: u64,
    /// 1-based line where the element starts.
    pub line: u64,
    /// Byte offset of the element in the (decompressed) file.
    pub offset: u64,
    /// The element's bytes (surrounding whitespace excluded), or why the array breaks off
    /// here: the last element then, since nothing after it can be told apart.
    pub text: std::result::Result<Vec<u8>, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArrayState {
    /// Before the opening `[` (and a UTF-8 BOM).
    Open,
    /// After `[`: an element or `]`.
    First,
    /// After `,`: an element.
    Next,
    /// After the closing `]`: only whitespace may follow.
    Closed,
    Done,
}

/// Reads the elements of a top-level JSON array one by one from a byte stream, so memory is
/// bounded by the largest element, not the file. Elements are delimited, not parsed: the
/// scan follows strings (with escapes) and bracket nesting to find the `,` or `]` that ends
/// each one, and each element's text is then parsed on its own like a JSONL line (so an
/// invalid element is one bad record). What breaks the array itself (a missing `]`, a
/// mismatched bracket, an empty element, data after the end) ends the stream with a last
/// element carrying the error.
pub struct ArrayElements<R> {
    reader: R,
    state: ArrayState,
    line: u64,
    offset: u64,
    index: u64,
    stack: Vec<u8>,
}

fn is_json_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl<R: BufRead> ArrayElements<R> {
    /// Elements of the array `reader` holds (it must start, after blanks and an optional
    /// UTF-8 BOM, with `[`).
    pub fn new(reader: R) -> Self {
        ArrayElements {
            reader,
            state: ArrayState::Open,
            line: 1,
            offset: 0,
            index: 0,
            stack: Vec::new(),
        }
    }

    /// Skip JSON whitespace; the next byte, not consumed (None at the end).
    fn peek_past_space(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(None);
            }
            let n = buf.iter().position(|&b| !is_json_space(b));
            let upto = n.unwrap_or(buf.len());
            let newlines = buf[..upto].iter().filter(|&&b| b == b'\n').count() as u64;
            let next = n.map(|i| buf[i]);
            self.reader.consume(upto);
            self.line += newlines;
            self.offset += upto as u64;
            if next.is_some() {
                return Ok(next);
            }
        }
    }

    fn broken(&mut self, msg: String) -> Option<ArrayElement> {
        self.state = ArrayState::Done;
        Some(ArrayElement {
            index: self.index,
            line: self.line,
            offset: self.offset,
            text: Err(format!(
                "{msg}; the JSON array cannot be read past this point"
            )),
        })
    }

    /// The next element, or None after the last one.
    pub fn next_element(&mut self) -> std::io::Result<Option<ArrayElement>> {
        loop {
            match self.state {
                ArrayState::Done => return Ok(None),
                ArrayState::Open => {
                    // A UTF-8 BOM, byte by byte (a buffer may hold less than all three).
                    for &want in b"\xEF\xBB\xBF" {
                        if self.reader.fill_buf()?.first() != Some(&want) {
                            break;
                        }
                        self.reader.consume(1);
                        self.offset += 1;
                    }
                    match self.peek_past_space()? {
                        Some(b'[') => {
                            self.reader.consume(1);
                            self.offset += 1;
                            self.state = ArrayState::First;
                        }
                        _ => return Ok(self.broken("expected a JSON array ('[')".into())),
                    }
                }
                ArrayState::Closed => {
                    return Ok(match self.peek_past_space()? {
                        None => {
                            self.state = ArrayState::Done;
                            None
                        }
                        Some(b) => self.broken(format!(
                            "unexpected {:?} after the closing ']' of the array",
                            b as char
                        )),
                    });
                }
                ArrayState::First | ArrayState::Next => {
                    return Ok(match self.peek_past_space()? {
                        None => self
                            .broken("unexpected end of file: the array has no closing ']'".into()),
                        Some(b']') if self.state == ArrayState::First => {
                            self.reader.consume(1);
                            self.offset += 1;
                            self.state = ArrayState::Closed;
                            continue;
                        }
                        Some(b @ (b']' | b',')) => {
                            self.broken(format!("expected an element, found {:?}", b as char))
                        }
                        Some(_) => Some(self.scan_element()?),
                    });
                }
            }
        }
    }

    /// Read one element up to the `,` or `]` that ends it (consumed, not included).
    fn scan_element(&mut self) -> std::io::Result<ArrayElement> {
        let (line, offset) = (self.line, self.offset);
        let mut text = Vec::new();
        let (mut in_str, mut esc) = (false, false);
        self.stack.clear();
        let end = loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                break Err(
                    "unexpected end of file inside the element: the array has no closing ']'"
                        .to_string(),
                );
            }
            let mut stop = None;
            for (i, &b) in buf.iter().enumerate() {
                if in_str {
                    if esc {
                        esc = false;
                    } else if b == b'\\' {
                        esc = true;
                    } else if b == b'"' {
                        in_str = false;
                    }
                    continue;
                }
                match b {
                    b'"' => in_str = true,
                    b'{' | b'[' => self.stack.push(b),
                    b'}' | b']' => match self.stack.pop() {
                        Some(open) if (open == b'{') == (b == b'}') => {}
                        Some(open) => {
                            stop = Some((
                                i,
                                Err(format!(
                                    "{:?} closes {:?} inside the element",
                                    b as char, open as char
                                )),
                            ));
                            break;
                        }
                        None if b == b']' => {
                            stop = Some((i, Ok(ArrayState::Closed)));
                            break;
                        }
                        None => {
                            stop = Some((i, Err("unbalanced '}' inside the element".into())));
                            break;
                        }
                    },
                    b',' if self.stack.is_empty() => {
                        stop = Some((i, Ok(ArrayState::Next)));
                        break;
                    }
                    _ => {}
                }
            }
            let upto = stop.as_ref().map_or(buf.len(), |s| s.0);
            text.extend_from_slice(&buf[..upto]);
            let newlines = buf[..upto].iter().filter(|&&b| b == b'\n').count() as u64;
            let taken = upto + usize::from(stop.is_some());
            self.reader.consume(taken);
            self.line += newlines;
            self.offset += taken as u64;
            if let Some((_, next)) = stop {
                break next;
            }
        };
        let index = self.index;
        self.index += 1;
        match end {
            Ok(next) => {
                self.state = next;
                let keep = text
                    .iter()
                    .rposition(|&b| !is_json_space(b))
                    .map_or(0, |i| i + 1);
                text.truncate(keep);
                Ok(ArrayElement {
                    index,
                    line,
                    offset,
                    text: Ok(text),
                })
            }
            Err(msg) => {
                self.state = ArrayState::Done;
                Ok(ArrayElement {
                    index,
                    line,
                    offset,
                    text: Err(format!(
                        "{msg}; the JSON array cannot be read past this point"
                    )),
                })
            }
        }
    }
}

/// Split decompressed file contents into records: a JSON array when the first non-blank byte
/// is `[` (its elements, as [`ArrayElements`] delimits them), else JSONL split on `\n` only
/// (U+2028/U+2029 are valid inside JSON strings and must not end a record). Blank lines are
/// skipped; a UTF-8 BOM is ignored.
pub fn split_records<'a>(path: &Path, data: &'a [u8]) -> Result<Vec<RawRecord<'a>>> {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    let first = data.iter().position(|b| !b.is_ascii_whitespace());
    let Some(first) = first else {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    };
    let mut out = Vec::new();
    if data[first] == b'[' {
        let mut elements = ArrayElements::new(data);
        while let Some(el) = elements.next_element().map_err(|e| Error::io(path, e))? {
            let json_err = |msg: String| Error::Json {
                path: path.to_path_buf(),
                line: el.line,
                msg: format!("record {}: {msg}", el.index),
            };
            let len = el.text.map_err(json_err)?.len();
            let start = el.offset as usize;
            let bytes = &data[start..start + len];
            let text = std::str::from_utf8(bytes).map_err(|e| {
                json_err(format!(
                    "invalid UTF-8 at byte {} of the element",
                    e.valid_up_to()
                ))
            })?;
            out.push(RawRecord {
                index: el.index,
                line: el.line,
                text,
            });
        }
    } else {
        let mut index = 0u64;
        for (i, raw_line) in data.split(|&b| b == b'\n').enumerate() {
            if raw_line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let text = std::str::from_utf8(raw_line).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                line: (i + 1) as u64,
                msg: format!("invalid UTF-8 at column {}", e.valid_up_to() + 1),
            })?;
            out.push(RawRecord {
                index,
                line: (i + 1) as u64,
                text,
            });
            index += 1;
        }
    }
    if out.is_empty() {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_splits_on_newline_only() {
        let data = "{\"text\": \"a\u{2028}b\"}\n\n{\"text\": \"c\u{2029}\"}\r\n".as_bytes();
        let recs = split_records(Path::new("x.jsonl"), data).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].line, 1);
        assert_eq!(recs[1].line, 3);
        assert_eq!(recs[1].index, 1);
        assert!(recs[0].text.contains('\u{2028}'));
    }

    #[test]
    fn json_array_records_carry_lines() {
        let data = b"[\n {\"text\": \"a\"},\n\n {\"text\": \"b\"}\n]";
        let recs = split_records(Path::new("x.json"), data).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!((recs[0].line, recs[1].line), (2, 4));
        assert_eq!(recs[1].text, "{\"text\": \"b\"}");
    }

    /// Every element of `data` through a reader whose buffer holds `cap` bytes.
    fn elements(data: &[u8], cap: usize) -> Vec<ArrayElement> {
        let mut it = ArrayElements::new(std::io::BufReader::with_capacity(cap, data));
        let mut out = Vec::new();
        while let Some(e) = it.next_element().unwrap() {
            out.push(e);
        }
        out
    }

    #[test]
    fn array_elements_equal_serde_raw_values_at_any_buffer_size() {
        use serde_json::value::RawValue;
        let arrays = [
            "[]",
            " \n[ 1 ,\"a,]\\\"[\" , {\"k\": [1, {\"x\": \"}\"}], \"s\": \"\\\\\"},\n\n[[]], null, -2.5e3 ]\n",
            "[{\"text\": \"line\\nbreak \\u005d\"},\r\n\t{\"text\": \"\u{2028}é\"}]",
            "\u{feff}[{\"a\": 1}]",
        ];
        for text in arrays {
            let body = text.trim_start_matches('\u{feff}');
            let want: Vec<&RawValue> = serde_json::from_str(body).unwrap();
            for cap in [1, 2, 7, 1 << 16] {
                let got = elements(text.as_bytes(), cap);
                assert_eq!(got.len(), want.len(), "{text:?} cap {cap}");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.index, i as u64);
                    assert_eq!(g.text.as_deref().unwrap(), w.get().as_bytes(), "cap {cap}");
                    let off = w.get().as_ptr() as usize - body.as_ptr() as usize;
                    let line = 1 + body[..off].matches('\n').count() as u64;
                    assert_eq!(g.line, line, "{text:?} element {i}");
                }
            }
        }
    }

    #[test]
    fn a_broken_array_ends_with_an_error_naming_the_element() {
        let cases: [(&str, u64, u64, &str); 6] = [
            ("[{\"a\": 1},\n {\"a\": 2", 1, 2, "no closing ']'"),
            ("[1, 2,]", 2, 1, "expected an element, found ']'"),
            ("[1,, 2]", 1, 1, "expected an element, found ','"),
            ("[1,\n{\"a\": [1}]", 1, 2, "'}' closes '['"),
            ("[1]\n x", 1, 2, "unexpected 'x' after the closing ']'"),
            ("[\"never closed]", 0, 1, "inside the element"),
        ];
        for (text, index, line, what) in cases {
            for cap in [1, 3, 1 << 16] {
                let got = elements(text.as_bytes(), cap);
                let last = got.last().unwrap();
                let e = last.text.as_ref().unwrap_err();
                assert!(e.contains(what), "{text:?}: {e}");
                assert_eq!((last.index, last.line), (index, line), "{text:?}");
                assert!(got[..got.len() - 1].iter().all(|e| e.text.is_ok()));
            }
            let e = split_records(Path::new("b.json"), text.as_bytes()).unwrap_err();
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("b.json:{line}: invalid JSON: record {index}: ")),
                "{shown}"
            );
        }
    }

    #[test]
    fn empty_and_blank_files_are_errors() {
        for d in [&b""[..], b"  \n\n", b"[]"] {
            let e = split_records(Path::new("e.jsonl"), d).unwrap_err();
            assert!(matches!(e, Error::EmptyFile { .. }), "{e}");
        }
    }

    #[test]
    fn bad_utf8_names_line() {
        let e = split_records(Path::new("u.jsonl"), b"{}\n{\"a\": \"\xff\"}\n").unwrap_err();
        assert!(e.to_string().starts_with("u.jsonl:2:"), "{e}");
    }

    #[test]
    fn directory_walk_is_sorted_and_data_order_refuses_escape() {
        let d = tempfile::tempdir().unwrap();
        for p in [
            "b/z.jsonl",
            "a.jsonl",
            "b/a.json.gz",
            ".hidden/x.jsonl",
            "c/notes.txt",
        ] {
            let f = d.path().join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, b"{}").unwrap();
        }
        let files = walk_dir(d.path(), DATA_EXTENSIONS).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.jsonl", "b/a.json.gz", "b/z.jsonl"]);

        let order = d.path().join("order.txt");
        std::fs::write(&order, "b/z.jsonl\na.jsonl\n").unwrap();
        let files = read_data_order(&order, d.path()).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["b/z.jsonl", "a.jsonl"]);

        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a.jsonl\na.jsonl",
            "missing.jsonl",
        ] {
            std::fs::write(&order, bad).unwrap();
            let e = read_data_order(&order, d.path()).unwrap_err();
            assert!(matches!(e, Error::DataOrder { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn a_save_to_disk_folder_is_its_data_files_in_state_order() {
        let d = tempfile::tempdir().unwrap();
        let saved = d.path().join("b/saved");
        std::fs::create_dir_all(&saved).unwrap();
        for f in [
            "data-1.arrow",
            "data-0.arrow",
            "dataset_info.json",
            "notes.jsonl",
        ] {
            std::fs::write(saved.join(f), b"x").unwrap();
        }
        std::fs::write(
            saved.join("state.json"),
            r#"{"_data_files": [{"filename": "data-1.arrow"}, {"filename": "data-0.arrow"}],
                "_fingerprint": "f"}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("a.jsonl"), b"{}").unwrap();
        std::fs::write(d.path().join("b/z.csv"), b"t\nx").unwrap();
        std::fs::write(d.path().join("b/saved.parquet"), b"x").unwrap();
        let names = |files: Vec<InputFile>| files.into_iter().map(|f| f.name).collect::<Vec<_>>();
        // The folder's files in the state's order (nothing else in it), sorted as the folder.
        assert_eq!(
            names(walk_dir(d.path(), DATA_EXTENSIONS).unwrap()),
            [
                "a.jsonl",
                "b/saved.parquet",
                "b/saved/data-1.arrow",
                "b/saved/data-0.arrow",
                "b/z.csv"
            ]
        );
        assert_eq!(
            names(
                resolve_inputs(&[saved.to_string_lossy().into_owned()], DATA_EXTENSIONS).unwrap()
            ),
            ["data-1.arrow", "data-0.arrow"]
        );
        std::fs::write(
            saved.join("state.json"),
            r#"{"_data_files": [{"filename": "../a.jsonl"}]}"#,
        )
        .unwrap();
        let e = walk_dir(d.path(), DATA_EXTENSIONS).unwrap_err();
        assert!(
            e.to_string().contains("not a file name inside the folder"),
            "{e}"
        );
        std::fs::write(
            d.path().join("dataset_dict.json"),
            r#"{"splits": ["train"]}"#,
        )
        .unwrap();
        let e = walk_dir(d.path(), DATA_EXTENSIONS).unwrap_err();
        assert!(e.to_string().contains("give one split's folder"), "{e}");
    }
}
