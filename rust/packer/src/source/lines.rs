//! Plain JSONL split by line without reading the bytes before a shard's share: where the
//! first line that begins in a range begins (one byte before it, then up to a newline),
//! the kind of the file from its first non-blank byte, and — on the error path alone — how
//! many lines and records come before a byte. Every byte is asked of the run's [`Fetch`]
//! first.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};
use crate::source::fetch::{self, Fetch};

/// Buffer of a JSON reader, and how far the first non-blank byte is looked for.
pub(crate) const PEEK: usize = 1 << 20;

/// Whether the first non-blank byte (after a BOM) of the first [`PEEK`] bytes of the plain
/// file `path` is a '[', read in small steps through `fetch`.
pub(crate) fn first_is_bracket(path: &Path, fetch: Option<&Fetch>) -> Result<bool> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; fetch::STEP as usize];
    let mut at = 0u64;
    while at < PEEK as u64 {
        let want = (PEEK as u64 - at).min(fetch::STEP) as usize;
        let n = fetch::read_at(&f, fetch, path, &mut buf[..want], at)?;
        let mut bytes = &buf[..n];
        if at == 0 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        if let Some(b) = bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            return Ok(*b == b'[');
        }
        if n < want {
            break;
        }
        at += n as u64;
    }
    Ok(false)
}

/// Where the first line that begins in `lo..hi` of the plain file `path` begins (`hi` or
/// beyond when none does): `lo` when it is the file's start or follows a newline, else just
/// past the next newline. Reads byte `lo - 1` and the bytes up to that newline only.
pub(crate) fn first_line_from(path: &Path, fetch: Option<&Fetch>, lo: u64, hi: u64) -> Result<u64> {
    if lo == 0 || lo >= hi {
        return Ok(lo);
    }
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut byte = [0u8; 1];
    if fetch::read_at(&f, fetch, path, &mut byte, lo - 1)? == 1 && byte[0] == b'\n' {
        return Ok(lo);
    }
    let mut buf = vec![0u8; fetch::STEP as usize];
    let mut at = lo;
    while at < hi {
        let want = (hi - at).min(fetch::STEP) as usize;
        let n = fetch::read_at(&f, fetch, path, &mut buf[..want], at)?;
        if let Some(k) = memchr::memchr(b'\n', &buf[..n]) {
            return Ok(at + k as u64 + 1);
        }
        if n < want {
            return Ok(hi);
        }
        at += n as u64;
    }
    Ok(hi)
}

/// Lines and records (non-blank lines) of the plain JSONL file `path` before byte `end`,
/// where a line begins: what a shard, whose records are numbered from its first line,
/// adds to name a bad record's line and index in the whole file. Read through `fetch`.
pub(crate) fn count_lines(path: &Path, fetch: Option<&Fetch>, end: u64) -> Result<(u64, u64)> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; PEEK];
    let (mut lines, mut records, mut filled) = (0u64, 0u64, false);
    let mut at = 0u64;
    while at < end {
        let want = (end - at).min(PEEK as u64) as usize;
        let n = fetch::read_at(&f, fetch, path, &mut buf[..want], at)?;
        let mut bytes = &buf[..n];
        if at == 0 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        for &b in bytes {
            if b == b'\n' {
                lines += 1;
                records += filled as u64;
                filled = false;
            } else if !b.is_ascii_whitespace() {
                filled = true;
            }
        }
        if n < want {
            break;
        }
        at += n as u64;
    }
    Ok((lines, records))
}
