//! One whole `pack` run from Rust, for a profiler (no Python frames in the way):
//!
//!     CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release -p packer \
//!         --example pack_profile
//!     perf record -g target/release/examples/pack_profile TOKENIZER_DIR DATA.jsonl OUT \
//!         [template] [threads] [repeats]
//!
//! Prints each run's load, encode and write seconds and the encode phase's M tokens per
//! second of one thread's wall time (divide by the threads for per core).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: pack_profile TOKENIZER DATA OUT [template] [threads] [repeats]");
        std::process::exit(2);
    }
    let mut cfg = packer::PackConfig {
        inputs: vec![args[2].clone()],
        out_dir: args[3].clone().into(),
        tokenizer: args[1].clone().into(),
        template: args.get(4).cloned().unwrap_or_else(|| "llama3_chat".into()),
        threads: Some(args.get(5).map_or(1, |t| t.parse().expect("threads"))),
        max_length: 4096,
        tokenizer_backend: packer::TokenizerBackend::Fast,
        ..Default::default()
    };
    cfg.format = "openai".into();
    let repeats: usize = args.get(6).map_or(1, |r| r.parse().expect("repeats"));
    for _ in 0..repeats {
        let _ = std::fs::remove_dir_all(&cfg.out_dir);
        let s = packer::pack(&cfg, &|_| true).expect("pack");
        let tokens = s.tokens + s.truncated_tokens + s.dropped_tokens;
        println!(
            "load {:.3} s, encode {:.3} s, write {:.3} s: {tokens} tokens, encode {:.2} M tok/s",
            s.load_seconds,
            s.encode_seconds,
            s.write_seconds,
            tokens as f64 / s.encode_seconds / 1e6
        );
    }
}
