//! Record splitting (JSONL / JSON array), every format's mapping and `auto` detection, every
//! template, on arbitrary bytes. Never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use packer::facts::Format;
use packer::facts::TEMPLATES;
use packer::internals::py_format;
use packer::internals::split_records;

fuzz_target!(|data: &[u8]| {
    if let Ok(recs) = split_records(Path::new("fuzz.jsonl"), data) {
        for r in recs.iter().take(64) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(r.text) else {
                continue;
            };
            let _ = Format::detect(&v);
            for name in Format::NAMES {
                let f = Format::from_name(name).expect("listed format");
                if let Ok(turns) = f.to_turns(&v) {
                    for t in TEMPLATES {
                        let mut tt = turns.clone();
                        let _ = t.apply(&mut tt);
                    }
                }
            }
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = py_format(s, &[("input", s), ("round", "1")]);
    }
});
