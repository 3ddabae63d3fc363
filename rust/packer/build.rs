//! Sets `cfg(shared_data)` when the real tokenizers and corpora exist (`../shared/data` beside
//! the checkout, or the directory `PYFAST_TUNE_SHARED_DATA` names), so the tests that read
//! them are marked ignored, with the reason, on a clone without them instead of passing
//! without checking anything.

use std::path::PathBuf;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(shared_data)");
    println!("cargo:rerun-if-env-changed=PYFAST_TUNE_SHARED_DATA");
    println!("cargo:rerun-if-changed=build.rs");
    let dir = std::env::var_os("PYFAST_TUNE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
                .join("../../../shared/data")
        });
    if dir.is_dir() {
        // Re-run when the data changes; when it is absent there is nothing to watch, and a
        // later `cargo clean -p packer` (or touching build.rs) picks it up.
        println!("cargo:rerun-if-changed={}", dir.display());
        println!("cargo:rustc-cfg=shared_data");
    }
}
