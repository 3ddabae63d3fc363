//! `.bin.meta` (`.npy`) headers and `.bin` token lines on arbitrary bytes. Never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use packer::internals::pretokenized as pretok;

fuzz_target!(|data: &[u8]| {
    let _ = pretok::read_npy_rows(Path::new("x.bin.meta"), data);
    let _ = pretok::decode_line(data);
});
