//! Fuzz harnesses for every reader and parser of the core: record splitting
//! (JSON arrays, JSONL, streamed and whole, plain and compressed), each format's record
//! mapping and `auto` detection, `--columns` specs, template formatting, data-order files and
//! `.bin`/`.bin.meta` pre-tokenized data. Property: never a panic — `Ok` or an `Error`.
//! See tests/fuzz_common/mod.rs for the budget (`FUZZ_CASES`) and the mutators.

mod fuzz_common;

use std::path::Path;

use fuzz_common::{config, json_value, mutated};
use packer::facts::Format;
use packer::facts::TEMPLATES;
use packer::internals::pretokenized as pretok;
use packer::internals::py_format;
use packer::internals::Columns;
use packer::internals::RecordStream;
use packer::internals::{read_data_order, split_records};
use proptest::prelude::*;

static RECORD_SEEDS: &[&[u8]] = &[
    br#"{"conversation": [{"system": "S", "input": "hi", "output": "yo"}, {"input": "again", "output": "ok", "output_with_loss": false}]}"#,
    br#"{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "loss": false}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
    br#"{"instruction": "Add", "input": "1 2", "output": "3"}"#,
    br#"{"instruction": "x", "input": "", "output": "<nooutput>"}"#,
    br#"{"text": "plain text \u2028 for pretraining"}"#,
    br####"{"text": "### Human: hi ### Assistant: yo ### Human: again ### Assistant: ok"}"####,
    br#"{"instruction_zh": "\u52a0", "input_zh": "", "output_zh": "\u4e09"}"#,
    br#"{"prompt": "write", "completion": "code"}"#,
    br#"{"prompt": "write", "response": "code"}"#,
    br#"{"input": "i", "output": "o"}"#,
    br#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}"#,
    br#"{"conversations": [{"from": "human", "value": "<image>\nwhat"}, {"from": "gpt", "value": "cat"}], "image": "a.png"}"#,
    br#"{"system_prompt": "S", "question": "q", "response": "r"}"#,
    br#"{"question": "q", "response": "r"}"#,
    br#"{"context": "CREATE TABLE t", "question": "q", "answer": "SELECT 1"}"#,
    br#"{"question": "q", "answer": "a"}"#,
    br#"{"abstract": "a", "title": "t"}"#,
    br#"{"description": "red", "color": "red"}"#,
];

static FILE_SEEDS: &[&[u8]] = &[
    b"{\"text\": \"a\"}\n{\"text\": \"b\xe2\x80\xa8\"}\n\n{\"text\": \"c\"}\r\n",
    b"\xEF\xBB\xBF{\"instruction\": \"i\", \"output\": \"o\"}\n",
    b"[\n {\"text\": \"a\"},\n\n {\"text\": \"b\"}\n]",
    b"  [{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}, {\"input\": 1}]  ",
    b"[]",
    b"\n\n",
];

fn all_formats() -> Vec<Format> {
    Format::NAMES
        .iter()
        .map(|n| Format::from_name(n).expect("listed format parses"))
        .collect()
}

/// Map a record with every format, then apply every template to the turns.
fn map_everything(v: &serde_json::Value) {
    let _ = Format::detect(v);
    for f in all_formats() {
        if let Ok(mut turns) = f.to_turns(v) {
            for t in TEMPLATES {
                let mut tt = turns.clone();
                let _ = t.apply(&mut tt);
                assert_eq!(tt.len(), turns.len());
            }
            let _ = packer::internals::messages_from_turns(&turns);
            turns.clear();
        }
    }
    let _ = packer::chat::messages_from_openai(v);
    let _ = packer::internals::llava_image(v);
}

proptest! {
    #![proptest_config(config())]

    /// JSONL / JSON-array splitting of arbitrary (mutated) file contents.
    #[test]
    fn fuzz_split_records(data in mutated(FILE_SEEDS)) {
        let path = Path::new("fuzz.jsonl");
        if let Ok(recs) = split_records(path, &data) {
            prop_assert!(!recs.is_empty());
            for (i, r) in recs.iter().enumerate() {
                prop_assert_eq!(r.index, i as u64);
                prop_assert!(r.line >= 1);
                if recs.len() > 1 && !data.iter().any(|b| !b.is_ascii_whitespace() && *b == b'[') {
                    prop_assert!(!r.text.contains('\n'));
                }
            }
        }
    }

    /// The streaming reader on the same inputs, plain, gzip and zstd (garbage compressed
    /// streams must be I/O errors, not panics).
    #[test]
    fn fuzz_record_stream(data in mutated(FILE_SEEDS), ext in prop_oneof![
        Just("jsonl"), Just("json"), Just("jsonl.gz"), Just("jsonl.zst")
    ], compress in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("f.{ext}"));
        let bytes = match (ext, compress) {
            ("jsonl.gz", true) => {
                use std::io::Write;
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&data).unwrap();
                e.finish().unwrap()
            }
            ("jsonl.zst", true) => zstd::encode_all(&data[..], 1).unwrap(),
            _ => data.clone(),
        };
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(mut s) = RecordStream::open(&path) {
            let mut n = 0;
            while let Ok(batch) = s.next_batch(3) {
                if batch.is_empty() { break; }
                for r in &batch {
                    if let Some(raw) = r.raw() {
                        let _ = serde_json::from_str::<serde_json::Value>(raw.text);
                    }
                }
                n += batch.len();
                prop_assert!(n <= data.len() + 1);
            }
            let _ = s.finish();
        }
    }

    /// Every format's mapping (and `auto` detection, and every template) on mutated records.
    #[test]
    fn fuzz_format_mapping_bytes(data in mutated(RECORD_SEEDS)) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) {
            map_everything(&v);
        }
    }

    /// The same on generated JSON trees built from every format's keys.
    #[test]
    fn fuzz_format_mapping_values(v in json_value()) {
        map_everything(&v);
    }

    /// `--columns` specs, applied to generated records.
    #[test]
    fn fuzz_columns(spec in "[a-z_=, ]{0,40}", v in json_value()) {
        if let Ok(c) = Columns::parse(&spec) {
            let again = Columns::parse(&c.spec()).expect("canonical spec parses");
            prop_assert_eq!(&again, &c);
            let mut v = v;
            c.apply(&mut v);
            map_everything(&v);
        }
    }

    /// Python `str.format` emulation with arbitrary format strings and field values.
    #[test]
    fn fuzz_py_format(fmt in "[{}a-z ]{0,24}|\\PC{0,24}", input in "\\PC{0,16}", round in "[0-9{}]{0,4}") {
        let out = py_format(&fmt, &[("input", &input), ("round", &round)]);
        // Without braces the format string comes back unchanged.
        if !fmt.contains(['{', '}']) {
            prop_assert_eq!(out, fmt);
        }
    }

    /// `.npy` headers of `.bin.meta` files.
    #[test]
    fn fuzz_npy(data in mutated(NPY_SEEDS.as_slice())) {
        if let Ok(rows) = pretok::read_npy_rows(Path::new("x.bin.meta"), &data) {
            prop_assert!(rows.len() <= data.len());
        }
    }

    /// One `.bin` line: `{"tokens": [...]}`.
    #[test]
    fn fuzz_bin_line(data in mutated(BIN_SEEDS)) {
        if let Ok((ids, mask)) = pretok::decode_line(&data) {
            prop_assert_eq!(ids.len(), mask.len());
        }
    }

    /// A whole `.bin` + `.bin.meta` pair, both mutated, read as the pipeline reads it (and
    /// with the meta rebuilt from the `.bin`).
    #[test]
    fn fuzz_bin_pair(bin in mutated(BIN_SEEDS), meta in mutated(NPY_SEEDS.as_slice()),
                     min_length in 0u64..4, rebuild in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        std::fs::write(&p, &bin).unwrap();
        std::fs::write(pretok::meta_path(&p), &meta).unwrap();
        if let Ok(mut f) = pretok::PretokFile::open(&p, min_length, rebuild) {
            while let Ok(rows) = f.next_batch(2) {
                if rows.is_empty() { break; }
                for r in rows {
                    if let Some(line) = &r.line {
                        if let Ok((ids, _)) = pretok::decode_line(line) {
                            let _ = pretok::check_count(&p, &r, ids.len());
                        }
                    }
                }
            }
        }
        let _ = pretok::read_all(&p, min_length);
    }

    /// Data-order files: entries may name files, directories, `..`, absolute paths, symlinks
    /// out of the root, NULs; an accepted entry always resolves inside the root.
    #[test]
    fn fuzz_data_order(lines in proptest::collection::vec(prop_oneof![
        4 => proptest::sample::select(&[
            "a.jsonl", "sub/b.jsonl", "./a.jsonl", "sub/../a.jsonl", "../outside.jsonl",
            "/etc/passwd", "link_out.jsonl", "link_in.jsonl", "sub", "missing.jsonl", "",
            "  ", "a.jsonl\r", "sub//b.jsonl", "sub/./b.jsonl", "linkdir/x.jsonl", "\0",
        ][..]).prop_map(str::to_string),
        1 => "\\PC{0,12}",
    ], 0..8)) {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.jsonl"), b"{}").unwrap();
        std::fs::write(root.join("sub/b.jsonl"), b"{}").unwrap();
        std::fs::write(base.path().join("outside.jsonl"), b"{}").unwrap();
        std::fs::create_dir_all(base.path().join("outdir")).unwrap();
        std::fs::write(base.path().join("outdir/x.jsonl"), b"{}").unwrap();
        std::os::unix::fs::symlink(base.path().join("outside.jsonl"), root.join("link_out.jsonl")).unwrap();
        std::os::unix::fs::symlink(root.join("a.jsonl"), root.join("link_in.jsonl")).unwrap();
        std::os::unix::fs::symlink(base.path().join("outdir"), root.join("linkdir")).unwrap();
        let order = base.path().join("order.txt");
        std::fs::write(&order, lines.join("\n")).unwrap();
        let canon_root = root.canonicalize().unwrap();
        if let Ok(files) = read_data_order(&order, &root) {
            for f in files {
                let c = f.path.canonicalize().unwrap();
                prop_assert!(c.starts_with(&canon_root), "{} escaped the root", c.display());
                prop_assert!(c.is_file());
            }
        }
    }
}

static BIN_SEEDS: &[&[u8]] = &[
    b"{\"tokens\": [1, -2, 3]}\n{\"tokens\": [4, 5]}\n",
    b"{\"tokens\": []}\n\n{\"tokens\": [-1]}",
    b"{\"tokens\": [4294967295, -4294967295]}\n",
];

static NPY_SEEDS: std::sync::LazyLock<Vec<&'static [u8]>> = std::sync::LazyLock::new(|| {
    let mut out = Vec::new();
    for rows in [&[(0u64, 3u64), (23, 2)][..], &[(0, 0)][..], &[]] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.npy");
        pretok::write_npy_rows(&p, rows).unwrap();
        out.push(&*Box::leak(std::fs::read(&p).unwrap().into_boxed_slice()));
    }
    // numpy's own bytes for np.save(np.array([[0, 3], [23, 2]], dtype='<i4')) in version 2.
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    let header = b"{'descr': '<i4', 'fortran_order': False, 'shape': (2, 2), }";
    let pad = (64 - (12 + header.len() + 1) % 64) % 64;
    v2.extend_from_slice(&((header.len() + pad + 1) as u32).to_le_bytes());
    v2.extend_from_slice(header);
    v2.extend(std::iter::repeat_n(b' ', pad));
    v2.push(b'\n');
    for x in [0i32, 3, 23, 2] {
        v2.extend_from_slice(&x.to_le_bytes());
    }
    out.push(&*Box::leak(v2.into_boxed_slice()));
    out
});

/// Regressions found by the harness are kept here as plain tests.
#[test]
fn npy_regressions() {
    // A v1 header whose length field points past the end.
    let mut b = b"\x93NUMPY\x01\x00\xff\xff{'descr'".to_vec();
    assert!(pretok::read_npy_rows(Path::new("m"), &b).is_err());
    b.truncate(9);
    assert!(pretok::read_npy_rows(Path::new("m"), &b).is_err());
}
