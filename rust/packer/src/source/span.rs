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
}
