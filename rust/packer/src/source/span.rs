//! Which part of each input file a sharded run reads: the leaf type every reader shares, so
//! the readers need not import the code that saves and merges part directories.

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
