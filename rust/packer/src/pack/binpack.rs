//! Global bin packing of whole samples: best-fit decreasing (BFD), then a seeded shuffle of
//! the packs and of the samples inside each pack, so batch order is random yet reproducible.
//!
//! BFD uses at most 11/9·OPT + 6/9 bins (Dósa 2007); on real length distributions (many
//! short samples to fill the gaps of long ones) it reaches > 99.5 % fill. Equal lengths are
//! broken by a seeded shuffle so that which equal-length samples share a pack is random too.

use crate::pack::rng::SplitMix64;

const STREAM_TIES: u64 = 1;
const STREAM_PACKS: u64 = 2;
const STREAM_WITHIN: u64 = 3;

/// Best-fit decreasing over `lengths`: (the placement order, each sample's pack, the number of
/// packs). Samples are placed longest first, equal lengths in a seeded shuffled order; each
/// goes into the pack with the least room that still fits it, or a new one (among packs with
/// the same room, the one that got it last). Fails (never panics) when a sample is empty or
/// longer than `capacity`.
///
/// Linear in the samples: a counting sort by length (stable, so ties keep the shuffled
/// order), and the packs with room kept in one LIFO list per amount of room, found through a
/// two-level bitset of the amounts that have a pack. Memory: the order and each sample's
/// pack (8 bytes per sample), a link per pack, and a few words per unit of capacity.
fn best_fit_decreasing(
    lengths: &[u32],
    capacity: u32,
    seed: u64,
) -> Result<(Vec<u32>, Vec<u32>, u32), String> {
    if capacity == 0 {
        return Err("capacity (max_length) must be positive".into());
    }
    if let Some((i, &l)) = lengths
        .iter()
        .enumerate()
        .find(|(_, &l)| l == 0 || l > capacity)
    {
        return Err(format!("sample {i} has length {l}, outside 1..={capacity}"));
    }
    let order = longest_first(lengths, capacity, seed);

    let mut pack_of = vec![0u32; lengths.len()];
    let mut rooms = Rooms::new(capacity);
    for &s in &order {
        let len = lengths[s as usize];
        let (pack, room) = match rooms.take_at_least(len) {
            Some(found) => found,
            None => (rooms.new_pack(), capacity),
        };
        pack_of[s as usize] = pack;
        rooms.put(pack, room - len);
    }
    Ok((order, pack_of, rooms.packs()))
}

/// Sample indices longest first, equal lengths in a seeded shuffled order: the shuffle, then
/// a stable counting sort by length (lengths are in `1..=capacity`).
fn longest_first(lengths: &[u32], capacity: u32, seed: u64) -> Vec<u32> {
    let mut shuffled: Vec<u32> = (0..lengths.len() as u32).collect();
    SplitMix64::new(seed, STREAM_TIES).shuffle(&mut shuffled);
    // key capacity - length: the longest first
    let counts = lengths.iter().map(|&l| (capacity - l) as usize);
    counting_sort(&shuffled, counts, capacity as usize + 1, |s| {
        (capacity - lengths[s as usize]) as usize
    })
    .0
}

/// `items` stably ordered by `key(item)` (in `0..buckets`), and where each key's run starts
/// (`buckets + 1` offsets). `keys` yields every item's key once, in any order (for counting:
/// a sequential pass where `key` would read at random).
fn counting_sort(
    items: &[u32],
    keys: impl Iterator<Item = usize>,
    buckets: usize,
    key: impl Fn(u32) -> usize,
) -> (Vec<u32>, Vec<u64>) {
    let mut start = vec![0u64; buckets + 1];
    for k in keys {
        start[k + 1] += 1;
    }
    for b in 0..buckets {
        start[b + 1] += start[b];
    }
    let mut next = start.clone();
    let mut sorted = vec![0u32; items.len()];
    for &item in items {
        let k = key(item);
        sorted[next[k] as usize] = item;
        next[k] += 1;
    }
    (sorted, start)
}

const NONE: u32 = u32::MAX;

/// The packs that still have room, by how much: a LIFO list per amount of room (linked
/// through the packs), and a bitset of the amounts whose list is not empty (`low`, one bit
/// per amount; `high`, one bit per word of `low`) to find the least amount >= a length.
struct Rooms {
    head: Vec<u32>,
    below: Vec<u32>,
    low: Vec<u64>,
    high: Vec<u64>,
}

impl Rooms {
    fn new(capacity: u32) -> Rooms {
        let amounts = capacity as usize + 1;
        let words = amounts.div_ceil(64);
        Rooms {
            head: vec![NONE; amounts],
            below: Vec::new(),
            low: vec![0; words],
            high: vec![0; words.div_ceil(64)],
        }
    }

    fn packs(&self) -> u32 {
        self.below.len() as u32
    }

    fn new_pack(&mut self) -> u32 {
        self.below.push(NONE);
        self.below.len() as u32 - 1
    }

    /// Put `pack` with `room` left on top of that amount's list (a full pack is not kept).
    fn put(&mut self, pack: u32, room: u32) {
        if room == 0 {
            return;
        }
        let r = room as usize;
        self.below[pack as usize] = self.head[r];
        self.head[r] = pack;
        self.low[r / 64] |= 1 << (r % 64);
        self.high[r / 4096] |= 1 << ((r / 64) % 64);
    }

    /// The pack on top of the list of the least amount of room >= `len`, taken off it, with
    /// that amount; None when no pack has that much room.
    fn take_at_least(&mut self, len: u32) -> Option<(u32, u32)> {
        let r = self.least_at_least(len as usize)?;
        let pack = self.head[r];
        self.head[r] = self.below[pack as usize];
        if self.head[r] == NONE {
            self.low[r / 64] &= !(1 << (r % 64));
            if self.low[r / 64] == 0 {
                self.high[r / 4096] &= !(1 << ((r / 64) % 64));
            }
        }
        Some((pack, r as u32))
    }

    fn least_at_least(&self, from: usize) -> Option<usize> {
        let w = from / 64;
        if w >= self.low.len() {
            return None;
        }
        let here = self.low[w] & (!0u64 << (from % 64));
        if here != 0 {
            return Some(w * 64 + here.trailing_zeros() as usize);
        }
        // the next non-empty word of `low` after w, through `high`
        let next = w + 1;
        let mut h = next / 64;
        if h >= self.high.len() {
            return None;
        }
        let mut bits = self.high[h] & (!0u64 << (next % 64));
        while bits == 0 {
            h += 1;
            if h >= self.high.len() {
                return None;
            }
            bits = self.high[h];
        }
        let word = h * 64 + bits.trailing_zeros() as usize;
        Some(word * 64 + self.low[word].trailing_zeros() as usize)
    }
}

/// Assign every sample (by index into `lengths`) to exactly one pack of at most `capacity`
/// tokens. Returns the packs in training order, each listing its samples in token order.
/// Fails (never panics) when a sample is empty or longer than `capacity`.
pub fn plan_packs(lengths: &[u32], capacity: u32, seed: u64) -> Result<Vec<Vec<u32>>, String> {
    let (order, pack_of, npacks) = best_fit_decreasing(lengths, capacity, seed)?;
    // Each pack's members in the order they were placed.
    let mut packs: Vec<Vec<u32>> = vec![Vec::new(); npacks as usize];
    for &s in &order {
        packs[pack_of[s as usize] as usize].push(s);
    }
    SplitMix64::new(seed, STREAM_PACKS).shuffle(&mut packs);
    let mut rng = SplitMix64::new(seed, STREAM_WITHIN);
    for p in &mut packs {
        rng.shuffle(p);
    }
    Ok(packs)
}

/// [`plan_packs`] in a flat form, for plans of billions of samples: the samples of every
/// pack in training order, one after another, and where each pack starts in that list (one
/// more entry than packs). The same plan, in 4 bytes per sample (plus the planner's order
/// and each sample's pack while it runs, 8 more) instead of a vector per pack.
pub fn plan_packs_flat(
    lengths: &[u32],
    capacity: u32,
    seed: u64,
) -> Result<(Vec<u32>, Vec<u64>), String> {
    let (order, pack_of, npacks) = best_fit_decreasing(lengths, capacity, seed)?;
    // Members of each pack in the order they were placed (plan_packs pushes them so): a
    // counting sort of `order` by pack, which keeps that order within a pack.
    let (placed, start) = counting_sort(
        &order,
        pack_of.iter().map(|&p| p as usize),
        npacks as usize,
        |s| pack_of[s as usize] as usize,
    );
    drop((order, pack_of));
    // The packs' shuffle (the same permutation as on a vector of packs: it depends on the
    // length only), then each pack's own shuffle in the new order, from the same streams.
    let mut packs: Vec<u32> = (0..npacks).collect();
    SplitMix64::new(seed, STREAM_PACKS).shuffle(&mut packs);
    let mut rng = SplitMix64::new(seed, STREAM_WITHIN);
    let mut flat = Vec::with_capacity(lengths.len());
    let mut bounds = Vec::with_capacity(npacks as usize + 1);
    bounds.push(0u64);
    for &p in &packs {
        let from = flat.len();
        flat.extend_from_slice(&placed[start[p as usize] as usize..start[p as usize + 1] as usize]);
        rng.shuffle(&mut flat[from..]);
        bounds.push(flat.len() as u64);
    }
    Ok((flat, bounds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(lengths: &[u32], cap: u32, packs: &[Vec<u32>]) {
        let mut seen = vec![0u32; lengths.len()];
        for p in packs {
            assert!(!p.is_empty());
            let total: u64 = p.iter().map(|&s| lengths[s as usize] as u64).sum();
            assert!(total <= cap as u64, "pack over capacity: {total} > {cap}");
            for &s in p {
                seen[s as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "every sample exactly once");
        let sum: u64 = lengths.iter().map(|&l| l as u64).sum();
        let lower = sum.div_ceil(cap as u64);
        // BFD bound: 11/9 OPT + 6/9 (+1 slack for the integer rounding).
        assert!(
            (packs.len() as u64) * 9 <= 11 * lower + 6 + 9,
            "too many packs"
        );
    }

    /// The comparison-sort, ordered-map form of best-fit decreasing that `best_fit_decreasing`
    /// replaced: the plans must stay the same bytes.
    fn reference_bfd(lengths: &[u32], capacity: u32, seed: u64) -> (Vec<u32>, Vec<u32>, u32) {
        use std::collections::BTreeMap;
        let mut order: Vec<u32> = (0..lengths.len() as u32).collect();
        SplitMix64::new(seed, STREAM_TIES).shuffle(&mut order);
        order.sort_by_key(|&i| std::cmp::Reverse(lengths[i as usize]));
        let mut pack_of = vec![0u32; lengths.len()];
        let mut npacks = 0u32;
        let mut by_room: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for &s in &order {
            let len = lengths[s as usize];
            let best = by_room
                .range_mut(len..)
                .next()
                .map(|(&room, ids)| (room, ids.pop().unwrap()));
            let (pack, room) = match best {
                Some((room, pack)) => {
                    if by_room.get(&room).is_some_and(Vec::is_empty) {
                        by_room.remove(&room);
                    }
                    (pack, room)
                }
                None => {
                    npacks += 1;
                    (npacks - 1, capacity)
                }
            };
            pack_of[s as usize] = pack;
            if room > len {
                by_room.entry(room - len).or_default().push(pack);
            }
        }
        (order, pack_of, npacks)
    }

    proptest! {
        #[test]
        fn same_plan_as_the_ordered_map_form(
            lengths in prop::collection::vec(1u32..=9000, 0..300),
            cap in 9000u32..20000,
            short in prop::collection::vec(1u32..=40, 0..300),
            seed: u64,
        ) {
            // long and short samples, capacities over 4096 (several words of the high bitset)
            let mut all = lengths.clone();
            all.extend(&short);
            prop_assert_eq!(best_fit_decreasing(&all, cap, seed).unwrap(), reference_bfd(&all, cap, seed));
            prop_assert_eq!(best_fit_decreasing(&short, 64, seed).unwrap(), reference_bfd(&short, 64, seed));
        }

        #[test]
        fn invariants(lengths in prop::collection::vec(1u32..=300, 0..400), cap in 300u32..1000, seed: u64) {
            let packs = plan_packs(&lengths, cap, seed).unwrap();
            check(&lengths, cap, &packs);
            prop_assert_eq!(&packs, &plan_packs(&lengths, cap, seed).unwrap());
        }

        #[test]
        fn flat_plan_is_the_same_plan(lengths in prop::collection::vec(1u32..=300, 0..400), cap in 300u32..1000, seed: u64) {
            let packs = plan_packs(&lengths, cap, seed).unwrap();
            let (flat, bounds) = plan_packs_flat(&lengths, cap, seed).unwrap();
            let again: Vec<Vec<u32>> = bounds.windows(2).map(|w| flat[w[0] as usize..w[1] as usize].to_vec()).collect();
            prop_assert_eq!(packs, again);
        }

        #[test]
        fn full_range_lengths(lengths in prop::collection::vec(1u32..=64, 1..200), seed: u64) {
            let packs = plan_packs(&lengths, 64, seed).unwrap();
            check(&lengths, 64, &packs);
        }
    }

    #[test]
    fn seed_changes_order_not_content_rules() {
        let lengths: Vec<u32> = (0..1000).map(|i| 1 + (i * 7919 % 500) as u32).collect();
        let a = plan_packs(&lengths, 1024, 0).unwrap();
        let b = plan_packs(&lengths, 1024, 1).unwrap();
        assert_ne!(a, b);
        check(&lengths, 1024, &a);
        let fill = lengths.iter().map(|&l| l as f64).sum::<f64>() / (a.len() as f64 * 1024.0);
        assert!(fill > 0.99, "fill {fill}");
    }

    /// `cargo test --release -p packer plan_speed -- --ignored --nocapture`: seconds per
    /// million samples of the plan, this form and the ordered-map form it replaced.
    #[test]
    #[ignore]
    fn plan_speed() {
        let n: usize = std::env::var("PLAN_SAMPLES").map_or(10_000_000, |v| v.parse().unwrap());
        let mut rng = SplitMix64::new(7, 9);
        // chat-like lengths: mostly short, a long tail up to the capacity
        let lengths: Vec<u32> = (0..n)
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                (1.0 + 4095.0 * u.powi(4)) as u32
            })
            .collect();
        type Plan = fn(&[u32], u32, u64) -> (Vec<u32>, Vec<u32>, u32);
        let linear: Plan = |l, c, s| best_fit_decreasing(l, c, s).unwrap();
        for (name, plan) in [("linear", linear), ("ordered map", reference_bfd as Plan)] {
            let t = std::time::Instant::now();
            let (_, _, packs) = plan(&lengths, 4096, 0);
            let s = t.elapsed().as_secs_f64();
            println!(
                "{name}: {n} samples -> {packs} packs in {s:.2} s = {:.3} us per sample",
                s * 1e6 / n as f64
            );
        }
    }

    #[test]
    fn bad_lengths_are_errors_not_panics() {
        assert!(plan_packs(&[5, 0], 10, 0).is_err());
        assert!(plan_packs(&[11], 10, 0).is_err());
        assert!(plan_packs(&[1], 0, 0).is_err());
        assert!(plan_packs(&[], 10, 0).unwrap().is_empty());
    }
}
