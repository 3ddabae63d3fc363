//! Pre-tokenized InternEVO/XTuner data: `X.bin` holds JSON lines `{"tokens": [...]}` and
//! `X.bin.meta` is `np.save` of an N×2 integer array (byte offset of the line, token count),
//! as XTuner's `JsonlDataset` reads them (`xtuner/dataset/intern_repo.py`): rows whose count
//! is below `min_length` are skipped, input id = |id|, label = id if id > 0 else -100.
//!
//! The `.npy` reader and writer follow numpy's documented format (`numpy.lib.format`):
//! magic `\x93NUMPY`, version, header length (u16 in v1, u32 in v2/v3), a Python dict literal
//! `{'descr': '<i8', 'fortran_order': False, 'shape': (N, 2), }`, then the raw array.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The meta file of a `.bin`: `X.bin.meta`.
pub fn meta_path(bin: &Path) -> PathBuf {
    let mut s = bin.as_os_str().to_owned();
    s.push(".meta");
    PathBuf::from(s)
}

fn corrupt(path: &Path, msg: String) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        msg,
    }
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let k = format!("'{key}':");
    let at = header.find(&k)? + k.len();
    Some(header[at..].trim_start())
}

/// Parse an `.npy` holding a 2-D integer array (N, K≥2); returns rows of (column 0, last
/// column), as XTuner takes `meta[:, 0]` and `meta[:, -1]`.
pub fn read_npy_rows(path: &Path, bytes: &[u8]) -> Result<Vec<(i64, i64)>> {
    let bad = |m: &str| corrupt(path, format!("not a valid .npy array: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(&format!("unsupported version {v}"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    let descr = header_value(header, "descr")
        .and_then(|v| v.strip_prefix('\''))
        .and_then(|v| v.split('\'').next())
        .ok_or_else(|| bad("no 'descr'"))?;
    let fortran = header_value(header, "fortran_order")
        .ok_or_else(|| bad("no 'fortran_order'"))?
        .starts_with("True");
    let shape_s = header_value(header, "shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| bad("no 'shape'"))?;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad(&format!("bad shape ({shape_s})")))?;
    let (n, k) = match shape.as_slice() {
        [0] => (0, 2),
        [n, k] if *k >= 2 => (*n, *k),
        _ => {
            return Err(bad(&format!(
                "expected an (N, 2) array of (byte offset, token count), got shape {shape:?}"
            )))
        }
    };
    let (big, kind, width) = {
        let b = descr.as_bytes();
        if b.len() < 3 {
            return Err(bad(&format!("dtype {descr:?}")));
        }
        let width: usize = descr[2..]
            .parse()
            .map_err(|_| bad(&format!("dtype {descr:?}")))?;
        (b[0] == b'>', b[1], width)
    };
    if !matches!(kind, b'i' | b'u') || !matches!(width, 1 | 2 | 4 | 8) {
        return Err(bad(&format!("expected an integer dtype, got {descr:?}")));
    }
    let data = &bytes[start + hlen..];
    if data.len() < n * k * width {
        return Err(bad(&format!(
            "{} data bytes for shape ({n}, {k}) of {descr}, need {}",
            data.len(),
            n * k * width
        )));
    }
    let at = |r: usize, c: usize| -> i64 {
        let i = if fortran { c * n + r } else { r * k + c };
        let mut buf = [0u8; 8];
        let src = &data[i * width..(i + 1) * width];
        if big {
            buf[8 - width..].copy_from_slice(src);
            buf.reverse();
        } else {
            buf[..width].copy_from_slice(src);
        }
        let v = u64::from_le_bytes(buf);
        if kind == b'i' && width < 8 && (v >> (width * 8 - 1)) & 1 == 1 {
            (v | (!0u64 << (width * 8))) as i64
        } else {
            v as i64
        }
    };
    Ok((0..n).map(|r| (at(r, 0), at(r, k - 1))).collect())
}

/// Write rows of (offset, count) as `np.save` would: format 1.0, `<i8`, C order, shape (N, 2).
pub fn write_npy_rows(path: &Path, rows: &[(u64, u64)]) -> Result<()> {
    let dict = format!(
        "{{'descr': '<i8', 'fortran_order': False, 'shape': ({}, 2), }}",
        rows.len()
    );
    // numpy pads the header with spaces and a newline to a multiple of 64 bytes.
    let total = (10 + dict.len() + 1).div_ceil(64) * 64;
    let mut out = Vec::with_capacity(total + rows.len() * 16);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&((total - 10) as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    for &(o, c) in rows {
        out.extend_from_slice(&(o as i64).to_le_bytes());
        out.extend_from_slice(&(c as i64).to_le_bytes());
    }
    let tmp = path.with_extension("meta.tmp");
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(&out)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[derive(serde::Deserialize)]
struct TokensLine {
    tokens: Vec<i64>,
}

/// The common line `{"tokens": [1, -2, ...]}` (JSON whitespace anywhere), parsed without a
/// general JSON parser; None for anything else (other keys, floats, leading zeros, overflow),
/// which then goes through serde_json and gets its exact error.
fn fast_tokens(line: &[u8]) -> Option<Vec<i64>> {
    let ws = |i: &mut usize| {
        while *i < line.len() && matches!(line[*i], b' ' | b'\t' | b'\n' | b'\r') {
            *i += 1;
        }
    };
    let lit = |i: &mut usize, s: &[u8]| -> Option<()> {
        line.get(*i..*i + s.len()).filter(|x| *x == s)?;
        *i += s.len();
        Some(())
    };
    let mut i = 0;
    ws(&mut i);
    lit(&mut i, b"{")?;
    ws(&mut i);
    lit(&mut i, b"\"tokens\"")?;
    ws(&mut i);
    lit(&mut i, b":")?;
    ws(&mut i);
    lit(&mut i, b"[")?;
    ws(&mut i);
    let mut out = Vec::with_capacity(line.len() / 7);
    if line.get(i) == Some(&b']') {
        i += 1;
    } else {
        loop {
            let neg = line.get(i) == Some(&b'-');
            i += neg as usize;
            let start = i;
            let mut v: i64 = 0;
            while let Some(d) = line.get(i).filter(|c| c.is_ascii_digit()) {
                v = v.checked_mul(10)?.checked_add((d - b'0') as i64)?;
                i += 1;
            }
            let n = i - start;
            if n == 0 || (n > 1 && line[start] == b'0') {
                return None;
            }
            out.push(if neg { -v } else { v });
            ws(&mut i);
            match line.get(i)? {
                b',' => {
                    i += 1;
                    ws(&mut i);
                }
                b']' => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    ws(&mut i);
    lit(&mut i, b"}")?;
    ws(&mut i);
    (i == line.len()).then_some(out)
}

/// Decode one line: ids = |token|, mask = token > 0.
pub fn decode_line(line: &[u8]) -> std::result::Result<(Vec<u32>, Vec<u8>), String> {
    let tokens = match fast_tokens(line) {
        Some(t) => t,
        None => {
            serde_json::from_slice::<TokensLine>(line)
                .map_err(|e| format!("expected a JSON line {{\"tokens\": [...]}}: {e}"))?
                .tokens
        }
    };
    let mut ids = Vec::with_capacity(tokens.len());
    let mut mask = Vec::with_capacity(tokens.len());
    for t in tokens {
        let a = t.unsigned_abs();
        if a > u32::MAX as u64 {
            return Err(format!("token id {t} does not fit in 32 bits"));
        }
        ids.push(a as u32);
        mask.push((t > 0) as u8);
    }
    Ok((ids, mask))
}

/// Scan a `.bin` and compute its meta rows (offset of each non-blank line, token count).
pub fn scan_bin(path: &Path) -> Result<Vec<(u64, u64)>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let (mut rows, mut off, mut buf) = (Vec::new(), 0u64, Vec::new());
    loop {
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        if !buf.iter().all(|b| b.is_ascii_whitespace()) {
            let (ids, _) = decode_line(&buf).map_err(|msg| Error::Record {
                path: path.to_path_buf(),
                line: rows.len() as u64 + 1,
                record: rows.len() as u64,
                msg: format!("at byte offset {off}: {msg}"),
            })?;
            rows.push((off, ids.len() as u64));
        }
        off += n as u64;
    }
    Ok(rows)
}

/// One row of a `.bin` as read: its meta row index, token count and, unless filtered out by
/// `min_length`, the line's bytes.
pub struct PretokRow {
    /// 0-based row of `.meta` (the record index reported for the sample).
    pub row: u64,
    /// Byte offset of the line.
    pub offset: u64,
    /// Token count from `.meta`.
    pub count: u64,
    /// The line, or None when `count < min_length`.
    pub line: Option<Vec<u8>>,
}

/// A `.bin` being read row by row in `.meta` order, seeking only when rows are not adjacent.
pub struct PretokFile {
    path: PathBuf,
    reader: BufReader<File>,
    pos: u64,
    size: u64,
    rows: Vec<(u64, u64)>,
    next: usize,
    min_length: u64,
    /// (size, BLAKE3) of the `.meta` file used.
    pub meta_hash: (u64, blake3::Hash),
}

impl PretokFile {
    /// Open `bin` and its `.meta`. A missing, unreadable or inconsistent `.meta` is an error
    /// naming the file, unless `rebuild_meta`: then it is rebuilt from the `.bin` (written
    /// atomically beside it) when missing or when it differs from the `.bin`'s lines.
    pub fn open(bin: &Path, min_length: u64, rebuild_meta: bool) -> Result<Self> {
        let mpath = meta_path(bin);
        let size = std::fs::metadata(bin).map_err(|e| Error::io(bin, e))?.len();
        let rows = if rebuild_meta {
            let scanned = scan_bin(bin)?;
            let current = std::fs::read(&mpath)
                .ok()
                .and_then(|b| read_npy_rows(&mpath, &b).ok());
            let same = current.is_some_and(|c| {
                c.len() == scanned.len()
                    && c.iter()
                        .zip(&scanned)
                        .all(|(a, b)| a.0 as u64 == b.0 && a.1 as u64 == b.1)
            });
            if !same {
                write_npy_rows(&mpath, &scanned)?;
            }
            scanned
        } else {
            let bytes = std::fs::read(&mpath).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    corrupt(
                        &mpath,
                        format!(
                            "missing: {} needs its .meta (np.save of N×2 byte offset, token count); \
                             pass --rebuild-meta to build it from the .bin",
                            bin.display()
                        ),
                    )
                } else {
                    Error::io(&mpath, e)
                }
            })?;
            let rows = read_npy_rows(&mpath, &bytes)?;
            let mut out = Vec::with_capacity(rows.len());
            for (i, &(o, c)) in rows.iter().enumerate() {
                if o < 0 || c < 0 || o as u64 >= size {
                    return Err(corrupt(
                        &mpath,
                        format!(
                            "row {i}: offset {o}, count {c} do not fit {} ({size} bytes); \
                             pass --rebuild-meta to rebuild it",
                            bin.display()
                        ),
                    ));
                }
                out.push((o as u64, c as u64));
            }
            out
        };
        let meta_hash = crate::source::raw::hash_file(&mpath)?;
        let f = File::open(bin).map_err(|e| Error::io(bin, e))?;
        Ok(PretokFile {
            path: bin.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, f),
            pos: 0,
            size,
            rows,
            next: 0,
            min_length,
            meta_hash,
        })
    }

    /// Rows in `.meta`.
    pub fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// Byte offset reached (for progress).
    pub fn position(&self) -> u64 {
        self.pos.min(self.size)
    }

    /// The next rows, at most `max_rows` and about [`crate::source::record::BATCH_BYTES`] of text;
    /// empty at the end.
    pub fn next_batch(&mut self, max_rows: usize) -> Result<Vec<PretokRow>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while self.next < self.rows.len() && out.len() < max_rows {
            if bytes >= crate::source::record::BATCH_BYTES {
                break;
            }
            let row = self.next;
            let (offset, count) = self.rows[row];
            self.next += 1;
            if count < self.min_length {
                out.push(PretokRow {
                    row: row as u64,
                    offset,
                    count,
                    line: None,
                });
                continue;
            }
            if offset != self.pos {
                let delta = offset as i64 - self.pos as i64;
                self.reader
                    .seek_relative(delta)
                    .or_else(|_| self.reader.seek(SeekFrom::Start(offset)).map(|_| ()))
                    .map_err(|e| Error::io(&self.path, e))?;
                self.pos = offset;
            }
            let mut line = Vec::new();
            let n = self
                .reader
                .read_until(b'\n', &mut line)
                .map_err(|e| Error::io(&self.path, e))?;
            self.pos += n as u64;
            bytes += n;
            out.push(PretokRow {
                row: row as u64,
                offset,
                count,
                line: Some(line),
            });
        }
        Ok(out)
    }
}

/// Check a decoded row against its `.meta` count.
pub fn check_count(path: &Path, row: &PretokRow, got: usize) -> std::result::Result<(), String> {
    if got as u64 != row.count {
        return Err(format!(
            "row {} says {} tokens at byte offset {} of {}, the line there has {got}: \
             the .meta does not match the .bin (pass --rebuild-meta to rebuild it)",
            row.row,
            row.count,
            row.offset,
            path.display()
        ));
    }
    Ok(())
}

/// One decoded `.bin` row: (meta row, ids, loss mask).
pub type DecodedRow = (u64, Vec<u32>, Vec<u8>);

/// Read `bin` whole with its meta and return (ids, mask) per kept row: the reference reader
/// used by tests and `pyfast-tune` tooling (bounded by the file's size).
pub fn read_all(bin: &Path, min_length: u64) -> Result<Vec<DecodedRow>> {
    let mut f = PretokFile::open(bin, min_length, false)?;
    let mut out = Vec::new();
    loop {
        let batch = f.next_batch(4096)?;
        if batch.is_empty() {
            break;
        }
        for r in batch {
            let Some(line) = &r.line else { continue };
            let (ids, mask) = decode_line(line).map_err(|msg| Error::Record {
                path: bin.to_path_buf(),
                line: r.row + 1,
                record: r.row,
                msg,
            })?;
            check_count(bin, &r, ids.len()).map_err(|msg| Error::Corrupt {
                path: meta_path(bin),
                msg,
            })?;
            out.push((r.row, ids, mask));
        }
    }
    Ok(out)
}

/// Whether a file is pre-tokenized InternEVO data (`.bin` with a `.bin.meta`).
pub fn is_pretokenized(path: &Path) -> bool {
    path.to_string_lossy().ends_with(".bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_and_foreign_layouts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.bin.meta");
        write_npy_rows(&p, &[(0, 3), (17, 1)]).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len() % 16, 0);
        assert_eq!(read_npy_rows(&p, &b).unwrap(), vec![(0, 3), (17, 1)]);
        // Fortran-ordered big-endian int32, (2, 2): column-major [0, 17, 3, 1].
        let hdr = "{'descr': '>i4', 'fortran_order': True, 'shape': (2, 2), }";
        let mut f = b"\x93NUMPY\x01\x00".to_vec();
        f.extend_from_slice(&(hdr.len() as u16).to_le_bytes());
        f.extend_from_slice(hdr.as_bytes());
        for v in [0i32, 17, 3, 1] {
            f.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(read_npy_rows(&p, &f).unwrap(), vec![(0, 3), (17, 1)]);
        assert!(read_npy_rows(&p, b"nope").is_err());
    }

    #[test]
    fn fast_path_agrees_with_serde() {
        for line in [
            "{\"tokens\": [1, -2, 3]}\n",
            "{\"tokens\":[]}",
            " {\t\"tokens\" : [ 0 , 7,9223372036854775807 ] } \r\n",
            "{\"tokens\": [-9223372036854775807]}",
        ] {
            let fast = fast_tokens(line.as_bytes()).unwrap();
            let slow: TokensLine = serde_json::from_str(line).unwrap();
            assert_eq!(fast, slow.tokens, "{line:?}");
        }
        for line in [
            "{\"tokens\": [01]}",
            "{\"tokens\": [1.0]}",
            "{\"tokens\": [1], \"x\": 2}",
            "{\"tokens\": [99999999999999999999]}",
            "{\"tokens\": [1,]}",
            "{\"tokens\": [-]}",
            "[1]",
        ] {
            assert!(fast_tokens(line.as_bytes()).is_none(), "{line:?}");
        }
        assert_eq!(
            decode_line(b"{\"tokens\": [1], \"x\": 2}").unwrap().0,
            vec![1]
        );
        // Python's json (XTuner's reader) takes -0 as the integer 0; serde_json would not.
        assert_eq!(fast_tokens(b"{\"tokens\": [-0]}"), Some(vec![0]));
        assert!(decode_line(b"{\"tokens\": [1.5]}").is_err());
        assert!(decode_line(b"{\"tokens\": [01]}").is_err());
    }

    #[test]
    fn bin_read_rebuild_and_inconsistency() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("a.bin");
        std::fs::write(&bin, "{\"tokens\": [1, -2, 3]}\n{\"tokens\": [-4]}\n").unwrap();
        let e = PretokFile::open(&bin, 0, false).err().unwrap();
        assert!(e.to_string().contains("--rebuild-meta"), "{e}");
        PretokFile::open(&bin, 0, true).unwrap();
        let rows = read_all(&bin, 0).unwrap();
        assert_eq!(rows[0], (0, vec![1, 2, 3], vec![1, 0, 1]));
        assert_eq!(rows[1], (1, vec![4], vec![0]));
        assert_eq!(read_all(&bin, 2).unwrap().len(), 1);
        write_npy_rows(&meta_path(&bin), &[(0, 3), (23, 2)]).unwrap();
        let e = read_all(&bin, 0).unwrap_err();
        assert!(e.to_string().contains("the .meta does not match"), "{e}");
    }
}
