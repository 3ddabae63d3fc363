//! Encoder speed alone, per core: a `tokenizer.json` and a JSONL file of `{"messages": [...]}`
//! or `{"text": ...}` records; prints the load time, then the first (cold memo) and later passes
//! over the texts in M tokens per CPU second of one thread. The compiled form of the tokenizer
//! is cached as `pack` caches it (a second run loads from it).
//!
//!     cargo run --release -p packer --example encode_speed -- tokenizer.json data.jsonl [passes]
//!         [threads]
//!
//! With `threads` > 1, each pass hands chunks of 64 texts to the threads in turn (as the pack
//! pipeline's batches go to its workers) and divides the tokens by the threads' CPU seconds
//! summed: per core, so a memo that threads share shows as a higher figure.

/// CPU seconds of this thread (the machine may be shared: wall time would count others' work).
fn cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

use packer::internals::tokenize::FastBpe;

fn texts(path: &str) -> Vec<String> {
    let data = std::fs::read_to_string(path).expect("read data");
    let mut out = Vec::new();
    for line in data.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        if let Some(ms) = v.get("messages").and_then(|m| m.as_array()) {
            out.extend(
                ms.iter()
                    .filter_map(|m| m["content"].as_str().map(String::from)),
            );
        } else if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
            out.push(t.to_string());
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let passes: usize = args.get(3).map_or(3, |p| p.parse().expect("passes"));
    let threads: usize = args.get(4).map_or(1, |p| p.parse().expect("threads"));
    let texts = texts(&args[2]);
    let json = std::fs::read(&args[1]).expect("read tokenizer.json");
    let t = cpu();
    let hash = blake3::hash(&json).to_hex().to_string();
    let fast = FastBpe::from_json_cached(&json, &hash).expect("fast path");
    println!("load {:.1} ms CPU", (cpu() - t) * 1e3);
    if threads > 1 {
        return threaded(&fast, &texts, passes, threads);
    }
    let mut out = Vec::new();
    let mut check = 0u64;
    for pass in 0..passes {
        let t = cpu();
        let mut n = 0;
        for s in &texts {
            out.clear();
            fast.encode_into(s, &mut out).expect("encode");
            n += out.len();
            if pass == 0 {
                check = out
                    .iter()
                    .fold(check, |h, &id| h.wrapping_mul(31).wrapping_add(id as u64));
            }
        }
        let dt = cpu() - t;
        println!(
            "pass {pass}: {n} tokens, {:.2} M tok/s per CPU second",
            n as f64 / dt / 1e6
        );
    }
    println!("ids checksum {check:016x}");
}

/// One thread's pass: tokens, CPU seconds, and a checksum of the ids of each chunk it encoded.
type ThreadPass = (usize, f64, Vec<(usize, u64)>);

/// [`main`]'s passes on `threads` threads: chunk `c` of 64 texts on thread `c % threads`.
fn threaded(fast: &FastBpe, texts: &[String], passes: usize, threads: usize) {
    let chunks: Vec<&[String]> = texts.chunks(64).collect();
    let mut check = 0u64;
    for pass in 0..passes {
        let per_thread: Vec<ThreadPass> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let chunks = &chunks;
                    s.spawn(move || {
                        let start = cpu();
                        let (mut n, mut sums, mut out) = (0, Vec::new(), Vec::new());
                        for c in (t..chunks.len()).step_by(threads) {
                            let mut h = 0u64;
                            for text in chunks[c] {
                                out.clear();
                                fast.encode_into(text, &mut out).expect("encode");
                                n += out.len();
                                h = out
                                    .iter()
                                    .fold(h, |h, &id| h.wrapping_mul(31).wrapping_add(id as u64));
                            }
                            sums.push((c, h));
                        }
                        (n, cpu() - start, sums)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let n: usize = per_thread.iter().map(|p| p.0).sum();
        let dt: f64 = per_thread.iter().map(|p| p.1).sum();
        if pass == 0 {
            let mut sums: Vec<(usize, u64)> = per_thread.into_iter().flat_map(|p| p.2).collect();
            sums.sort_unstable();
            check = sums
                .iter()
                .fold(0, |a, &(_, h)| a.wrapping_mul(1_000_003) ^ h);
        }
        println!(
            "pass {pass}: {n} tokens on {threads} threads, {:.2} M tok/s per CPU second",
            n as f64 / dt / 1e6
        );
    }
    println!("ids checksum (per chunk) {check:016x}");
}
