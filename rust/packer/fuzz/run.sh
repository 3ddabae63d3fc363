#!/bin/sh
# Build and run one libFuzzer target for a number of seconds; JOBS > 1 runs that many
# processes (their output goes to fuzz-N.log) (stable Rust: sancov is a stable
# codegen pass; --cfg fuzzing as cargo-fuzz sets it). Usage: run.sh TARGET SECONDS [JOBS]
#   rust/packer/fuzz/run.sh records 600
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target=$1; secs=${2:-60}; jobs=${3:-1}
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
cargo build --release --manifest-path "$here/Cargo.toml" --target-dir "$here/target" --bin "$target" \
  --target x86_64-unknown-linux-gnu  # so RUSTFLAGS skip build scripts, as cargo-fuzz does
mkdir -p "$here/corpus/$target" "$here/artifacts/$target"
exec "$here/target/x86_64-unknown-linux-gnu/release/$target" "$here/corpus/$target" -max_total_time="$secs" \
  -artifact_prefix="$here/artifacts/$target/" -print_final_stats=1 -max_len=65536 \
  $([ "$jobs" -gt 1 ] && echo "-jobs=$jobs -workers=$jobs")
