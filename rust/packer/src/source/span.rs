//! Which part of each input file a sharded run reads: the leaf type every reader shares, so
//! the readers need not import the code that saves and merges part directories.
//!
//! Two rules place a unit in a shard. A line of a JSONL file belongs to the shard whose
//! share holds its first byte ([`Span::lines`]), as Hadoop splits text: a shard starts at
//! the first line that begins in its share (one byte before the share tells whether a line
//! begins at its first byte) and finishes the line that crosses its end, so it never reads
//! the bytes before its share — the file's prefix is not fetched from object storage, nor
//! scanned on disk. Every other unit (a Parquet row group, an Arrow record batch, a CSV row,
//! a file read whole) belongs to the shard its midpoint falls in ([`Span::place`]): CSV may
//! quote a newline, so a row cannot be found from an arbitrary byte, and its shards read the
//! file from its start. (Lines were placed by midpoint too; a shard then had to read from
//! the file's start to find the start of each line, and every shard touching a large object
//! downloaded all of it.)

use std::cmp::Ordering;

/// Where one file lies in the inputs laid end to end, and which shard is reading: places
/// each unit of the file (its bytes `start..end`) before, in or after the shard's share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Bytes of the inputs before this file.
    base: u64,
    /// Bytes of all inputs.
    total: u64,
    i: usize,
    n: usize,
}

impl Span {
    /// A single run: every unit is in.
    pub const ALL: Span = Span {
        base: 0,
        total: 0,
        i: 0,
        n: 1,
    };

    /// The span of shard `i` of `n` over a file preceded by `base` of `total` input bytes.
    pub fn new(base: u64, total: u64, i: usize, n: usize) -> Span {
        Span { base, total, i, n }
    }

    /// The shard of the unit at bytes `start..end` of the file, compared with this shard.
    pub fn place(&self, start: u64, end: u64) -> Ordering {
        if self.n <= 1 || self.total == 0 {
            return 0.cmp(&self.i);
        }
        // Twice the midpoint, so an odd length needs no rounding.
        let mid2 = 2 * self.base as u128 + start as u128 + end as u128;
        let shard = (mid2 * self.n as u128 / (2 * self.total as u128)).min(self.n as u128 - 1);
        (shard as usize).cmp(&self.i)
    }

    /// The bytes `lo..hi` of a file of `size` bytes in which the lines this shard reads
    /// begin: the file's part of its share (a line belongs to the shard holding its first
    /// byte).
    pub fn lines(&self, size: u64) -> (u64, u64) {
        if self.n <= 1 || self.total == 0 {
            return if self.i == 0 { (0, size) } else { (0, 0) };
        }
        // Byte g of the inputs is in share floor(g * n / total): share i starts at
        // ceil(i * total / n).
        let at = |i: usize| {
            let g = (i as u128 * self.total as u128).div_ceil(self.n as u128) as u64;
            g.saturating_sub(self.base).min(size)
        };
        let hi = if self.i + 1 >= self.n {
            size
        } else {
            at(self.i + 1)
        };
        (at(self.i).min(hi), hi)
    }

    /// Whether this shard holds the file's first byte: it reports faults of the whole file.
    pub fn is_head(&self) -> bool {
        self.place(0, 0) == Ordering::Equal
    }

    /// Whether any unit of a file of `size` bytes can fall in this shard.
    pub fn may_touch(&self, size: u64) -> bool {
        self.place(0, 0) != Ordering::Greater && self.place(size, size) != Ordering::Less
    }

    /// With whole files ([`crate::config::PackConfig::whole_files`]): whether a file of
    /// `size` bytes is one unit, read whole by the shard its midpoint falls in — a file of
    /// at most one shard's share of the bytes. Larger files are still split by unit.
    pub fn whole_unit(&self, size: u64) -> bool {
        self.n > 1 && size as u128 * self.n as u128 <= self.total as u128
    }

    /// Whether this shard reads any byte of a file of `size` bytes (`whole`: files that are
    /// one unit are read by their owner alone).
    pub fn reads(&self, size: u64, whole: bool) -> bool {
        if whole && self.whole_unit(size) {
            self.place(0, size).is_eq()
        } else {
            self.may_touch(size)
        }
    }
}

/// For shard `i` of `n` over files of these sizes (in input order): which files it reads
/// ([`Span::reads`]); what a front end must fetch for it.
pub fn files_read(sizes: &[u64], i: usize, n: usize, whole: bool) -> Vec<bool> {
    let total: u64 = sizes.iter().sum();
    let mut base = 0u64;
    sizes
        .iter()
        .map(|&size| {
            let span = Span::new(base, total, i, n);
            base += size;
            span.reads(size, whole)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_place_every_unit_in_one_shard_in_order() {
        // Files of these sizes, cut into units of 7 bytes (the last shorter).
        for sizes in [
            vec![10u64, 10, 10, 10, 10, 10],
            vec![100, 1, 1, 1, 1],
            vec![5],
            vec![0, 9],
        ] {
            let total: u64 = sizes.iter().sum();
            for n in 1..6 {
                let mut last = 0;
                let mut counts = vec![0u64; n];
                let mut base = 0;
                for &size in &sizes {
                    let heads = (0..n)
                        .filter(|&i| Span::new(base, total, i, n).is_head())
                        .count();
                    assert_eq!(heads, 1, "{sizes:?} /{n}");
                    let mut start = 0;
                    while start < size {
                        let end = (start + 7).min(size);
                        let owners: Vec<usize> = (0..n)
                            .filter(|&i| Span::new(base, total, i, n).place(start, end).is_eq())
                            .collect();
                        assert_eq!(owners.len(), 1, "{sizes:?} /{n}");
                        let o = owners[0];
                        assert!(o >= last, "units go to shards in order");
                        assert!(Span::new(base, total, o, n).may_touch(size));
                        last = o;
                        counts[o] += end - start;
                        start = end;
                    }
                    base += size;
                }
                assert_eq!(counts.iter().sum::<u64>(), total);
            }
        }
        // Equal shares of one file cut in bytes.
        let counts: Vec<u64> = (0..4)
            .map(|i| {
                (0..1000)
                    .filter(|&b| Span::new(0, 1000, i, 4).place(b, b + 1).is_eq())
                    .count() as u64
            })
            .collect();
        assert_eq!(counts, [250, 250, 250, 250]);
        assert_eq!(Span::ALL.place(5, 9), Ordering::Equal);
    }

    #[test]
    fn lines_belong_to_the_shard_holding_their_first_byte() {
        for (base, size, total) in [
            (0u64, 1000u64, 1000u64),
            (100, 7, 150),
            (3, 50, 97),
            (0, 5, 5),
        ] {
            for n in 1..7 {
                let mut next = 0;
                for i in 0..n {
                    let span = Span::new(base, total, i, n);
                    let (lo, hi) = span.lines(size);
                    assert_eq!(
                        lo, next,
                        "shares are contiguous: {base} {size} {total} /{n}"
                    );
                    next = hi;
                    for b in 0..size {
                        assert_eq!(
                            (lo..hi).contains(&b),
                            span.place(b, b).is_eq(),
                            "byte {b}: {base} {size} {total} {i}/{n}"
                        );
                    }
                }
                assert_eq!(next, size);
            }
        }
        assert_eq!(Span::ALL.lines(9), (0, 9));
    }

    #[test]
    fn whole_files_are_read_by_one_shard_and_large_ones_split_as_before() {
        let sizes = [10u64, 10, 100, 5, 30, 0];
        for n in 1..6 {
            let reads: Vec<Vec<bool>> = (0..n).map(|i| files_read(&sizes, i, n, true)).collect();
            let split: Vec<Vec<bool>> = (0..n).map(|i| files_read(&sizes, i, n, false)).collect();
            for (f, &size) in sizes.iter().enumerate() {
                let readers = reads.iter().filter(|r| r[f]).count();
                if n > 1 && size * n as u64 <= sizes.iter().sum::<u64>() {
                    assert_eq!(readers, 1, "file {f} of {n} shards");
                    // its owner is among the shards that would read part of it
                    let owner = reads.iter().position(|r| r[f]).expect("one reader");
                    assert!(split[owner][f]);
                } else {
                    let touching: Vec<bool> = split.iter().map(|r| r[f]).collect();
                    assert_eq!(reads.iter().map(|r| r[f]).collect::<Vec<_>>(), touching);
                }
            }
        }
    }
}
