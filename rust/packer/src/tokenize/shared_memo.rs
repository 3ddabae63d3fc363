//! The memo of multi-token pieces shared by every thread that encodes with one
//! [`super::fastbpe::FastBpe`]: what one thread has merged, the others read, so that two
//! threads do not both pay for the same new pieces (each merge is ~1 µs of dependent lookups
//! into the merge table, against ~20 ns for a memo hit).
//!
//! An open-addressing table of 32-byte slots (key and ids side by side, two to a cache line),
//! linear probing, at most half full; ids of more than three tokens in an append-only arena.
//! Entries are only ever added, never changed or moved, so a reader needs no lock: a writer
//! claims an empty slot with one compare-and-swap, writes the entry, then publishes it with a
//! release store of its tag, which a reader loads with acquire (plain loads on x86). A writer
//! that meets a slot being written by another thread gives up: the memo only saves work, the
//! ids never depend on what it holds (a piece's ids are a function of the piece), so the
//! output is the same for any thread count or timing.
//!
//! The table starts small and doubles (a copy published as the new table; threads move to it
//! at their next text, and the old one is freed when the last leaves it): a table sized to its
//! entries keeps the frequent ones in fewer cache lines (a fixed 16 MB table measured ~5%
//! slower on 2,000 conversations than a per-thread one of 2 MB). Memory is bounded: 2^19
//! slots (16 MB) at most, and 8 MB of arena, touched only as filled (it fills in order).

use std::alloc::Layout;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::piece_table::{hash, prefetch, HugeSlice};

/// Log2 of the first table's slots.
const FIRST_BITS: u32 = 15;
/// Log2 of the largest table's slots.
const MAX_BITS: u32 = 19;
/// Arena length in ids.
const ARENA: usize = 1 << 21;
/// Entries a thread adds before it counts them in the table's `len` ([`View::uncounted`]).
const COUNT_BATCH: usize = 32;
/// Slots probed by an insert before it gives up.
const MAX_PROBE: usize = 64;
/// Set in a slot's tag once its entry is complete. Keys' high words have their length
/// (1 to 15) in the top byte, so never this bit.
const READY: u64 = 1 << 63;

/// Ids of one piece: the count, then up to three ids inline, or (more than three) their start
/// in the arena in the first.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub(super) struct Ids {
    pub n: u32,
    pub ids: [u32; 3],
}

impl Ids {
    /// The entry for `ids`: inline when three or fewer, else `spilled_at` (where the caller
    /// keeps them) in the first.
    pub fn of(ids: &[u32], spilled_at: u32) -> Ids {
        let mut v = Ids {
            n: ids.len() as u32,
            ids: [0; 3],
        };
        if ids.len() <= 3 {
            v.ids[..ids.len()].copy_from_slice(ids);
        } else {
            v.ids[0] = spilled_at;
        }
        v
    }
}

/// One slot: `tag` is the key's high word (0: empty; without [`READY`]: being written),
/// `lo` the key's low word, `v0`/`v1` the packed [`Ids`].
#[derive(Default)]
#[repr(C, align(32))]
struct Slot {
    tag: AtomicU64,
    lo: AtomicU64,
    v0: AtomicU64,
    v1: AtomicU64,
}

/// `len` zeroed `T`s in pages of their own, untouched (so not resident) until written.
struct ZeroedPages<T> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
}

// SAFETY: a `ZeroedPages<T>` owns its `T`s like a `Box<[T]>`.
unsafe impl<T: Send> Send for ZeroedPages<T> {}
// SAFETY: as above; shared access gives `&[T]` only.
unsafe impl<T: Sync> Sync for ZeroedPages<T> {}

impl<T> ZeroedPages<T> {
    /// # Safety
    /// All-zero bytes must be a valid `T`, and `T` must need no drop.
    unsafe fn new(len: usize) -> Self {
        let layout = Layout::array::<T>(len).expect("table size");
        assert!(layout.size() > 0 && layout.align() <= 4096);
        #[cfg(unix)]
        // SAFETY: an anonymous private mapping: fresh zeroed memory, page-aligned.
        let ptr = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                std::alloc::handle_alloc_error(layout);
            }
            p.cast::<T>()
        };
        #[cfg(not(unix))]
        // SAFETY: a non-zero size (asserted above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout).cast::<T>() };
        ZeroedPages {
            ptr: std::ptr::NonNull::new(ptr)
                .unwrap_or_else(|| std::alloc::handle_alloc_error(layout)),
            len,
        }
    }
}

impl<T> std::ops::Deref for ZeroedPages<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` zeroed `T`s (valid by `new`'s contract), owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for ZeroedPages<T> {
    fn drop(&mut self) {
        let layout = Layout::array::<T>(self.len).expect("table size");
        #[cfg(unix)]
        // SAFETY: the mapping made by `new`, of this size, unmapped once (`T` needs no drop).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), layout.size());
        }
        #[cfg(not(unix))]
        // SAFETY: allocated by `new` with this layout (`T` needs no drop).
        unsafe {
            std::alloc::dealloc(self.ptr.as_ptr().cast(), layout);
        }
    }
}

/// One table of the memo: `2^bits` slots.
pub(super) struct Table {
    slots: HugeSlice<Slot>,
    bits: u32,
    len: AtomicUsize,
}

impl Table {
    fn new(bits: u32) -> Table {
        Table {
            slots: HugeSlice::with(1 << bits, Slot::default),
            bits,
            len: AtomicUsize::new(0),
        }
    }

    #[inline]
    fn first(&self, h: u64) -> usize {
        (h >> (64 - self.bits)) as usize
    }

    /// Prefetch the first slot a lookup of a key of hash `h` reads.
    #[inline]
    pub(super) fn prefetch_hash(&self, h: u64) {
        prefetch(&self.slots[self.first(h)]);
    }

    /// The ids of key `k` (never 0) of hash `h`, if memoised.
    #[inline]
    pub(super) fn get_hashed(&self, k: u128, h: u64) -> Option<Ids> {
        let (lo, hi) = split(k);
        let want = hi | READY;
        let mask = self.slots.len() - 1;
        let mut i = self.first(h);
        loop {
            let s = &self.slots[i];
            // Acquire: the entry's other words were written before its tag was.
            let tag = s.tag.load(Ordering::Acquire);
            if tag == want && s.lo.load(Ordering::Relaxed) == lo {
                let (v0, v1) = (s.v0.load(Ordering::Relaxed), s.v1.load(Ordering::Relaxed));
                return Some(Ids {
                    n: v0 as u32,
                    ids: [(v0 >> 32) as u32, v1 as u32, (v1 >> 32) as u32],
                });
            }
            if tag == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Add the entry of key (`lo`, `hi`) with packed ids `v0`, `v1` unless the key is there
    /// or another thread is writing where it would go; whether it was added.
    fn insert(&self, lo: u64, hi: u64, h: u64, v0: u64, v1: u64) -> bool {
        let mask = self.slots.len() - 1;
        let mut i = self.first(h);
        for _ in 0..MAX_PROBE {
            let s = &self.slots[i];
            let tag = match s
                .tag
                .compare_exchange(0, hi, Ordering::Relaxed, Ordering::Acquire)
            {
                Ok(_) => {
                    s.lo.store(lo, Ordering::Relaxed);
                    s.v0.store(v0, Ordering::Relaxed);
                    s.v1.store(v1, Ordering::Relaxed);
                    s.tag.store(hi | READY, Ordering::Release);
                    return true;
                }
                Err(tag) => tag,
            };
            if tag & READY == 0 || (tag == hi | READY && s.lo.load(Ordering::Relaxed) == lo) {
                return false;
            }
            i = (i + 1) & mask;
        }
        false
    }

    /// Whether the table takes no more entries (half full, give or take the entries threads
    /// have not counted yet).
    fn full(&self) -> bool {
        2 * self.len.load(Ordering::Relaxed) >= self.slots.len()
    }
}

/// The shared memo: piece key ([`super::piece_table::key_of`]) → [`Ids`].
pub(super) struct SharedMemo {
    /// The current table; `generation` counts its replacements.
    table: Mutex<Arc<Table>>,
    generation: AtomicU64,
    /// The ids of entries of more than three, `arena_len` of them used (or reserved).
    /// Shared by the tables, so an entry's arena start stays right when copied.
    arena: ZeroedPages<AtomicU32>,
    arena_len: AtomicUsize,
}

/// A thread's view of a [`SharedMemo`]: the table it reads until its next text.
#[derive(Default)]
pub(super) struct View {
    table: Option<Arc<Table>>,
    generation: u64,
    /// Entries this thread has added to `table` and not yet counted in its `len`: counted
    /// [`COUNT_BATCH`] at a time, so that threads adding entries do not pass the cache line
    /// of `len` to and fro on each (the count only decides when the table grows).
    uncounted: usize,
}

impl Default for SharedMemo {
    fn default() -> Self {
        SharedMemo {
            table: Mutex::new(Arc::new(Table::new(FIRST_BITS))),
            generation: AtomicU64::new(0),
            // SAFETY: all-zero atomics are zero values, and need no drop.
            arena: unsafe { ZeroedPages::new(ARENA) },
            arena_len: AtomicUsize::new(0),
        }
    }
}

#[inline]
fn split(k: u128) -> (u64, u64) {
    (k as u64, (k >> 64) as u64)
}

impl SharedMemo {
    /// The current table, taken out of `view` (a thread's own) for the thread to read until
    /// it gives it back with [`SharedMemo::put_table`]: one atomic load when the table has
    /// not changed since (no reference count is touched: threads share no written line).
    pub(super) fn take_table(&self, view: &mut View) -> Arc<Table> {
        let generation = self.generation.load(Ordering::Acquire);
        match view.table.take() {
            Some(t) if view.generation == generation => t,
            _ => {
                let t = self.table.lock().unwrap_or_else(|e| e.into_inner()).clone();
                // The generation read before the lock: a later change is seen next time.
                (view.generation, view.uncounted) = (generation, 0);
                t
            }
        }
    }

    /// Give back the table [`SharedMemo::take_table`] took out of `view`.
    pub(super) fn put_table(view: &mut View, table: Arc<Table>) {
        view.table = Some(table);
    }

    /// Memoise `ids` (a piece's whole encoding) under key `k` of hash `h` in `table` (the one
    /// taken out of `view`), unless the memo is full, holds `k` already, or another thread is
    /// writing where `k` would go. A full table is replaced by one twice its size.
    pub(super) fn insert(&self, view: &mut View, table: &Table, k: u128, h: u64, ids: &[u32]) {
        if table.full() {
            self.grow(table);
            return;
        }
        let mut at = 0;
        if ids.len() > 3 {
            let Some(got) = self.reserve(ids.len()) else {
                return;
            };
            for (a, &id) in self.arena[got..got + ids.len()].iter().zip(ids) {
                // Not yet published: no reader looks here before the release in `insert`.
                a.store(id, Ordering::Relaxed);
            }
            at = got;
        }
        let v = Ids::of(ids, at as u32);
        let (lo, hi) = split(k);
        let v0 = u64::from(v.n) | u64::from(v.ids[0]) << 32;
        let v1 = u64::from(v.ids[1]) | u64::from(v.ids[2]) << 32;
        if table.insert(lo, hi, h, v0, v1) {
            view.uncounted += 1;
            if view.uncounted == COUNT_BATCH {
                table.len.fetch_add(COUNT_BATCH, Ordering::Relaxed);
                view.uncounted = 0;
            }
        }
    }

    /// Replace the full table `old`, if still current and not the largest, by a copy of it
    /// twice its size. Skipped while another thread is doing it (its entries meanwhile added
    /// to `old` are not copied: the memo may miss what it could have held, never more).
    #[cold]
    fn grow(&self, old: &Table) {
        if old.bits >= MAX_BITS {
            return;
        }
        let Ok(mut current) = self.table.try_lock() else {
            return;
        };
        if !std::ptr::eq(&**current, old) {
            return;
        }
        let new = Table::new(old.bits + 1);
        for s in old.slots.iter() {
            let tag = s.tag.load(Ordering::Acquire);
            if tag & READY != 0 {
                let (hi, lo) = (tag & !READY, s.lo.load(Ordering::Relaxed));
                let h = hash(u128::from(lo) | u128::from(hi) << 64);
                let (v0, v1) = (s.v0.load(Ordering::Relaxed), s.v1.load(Ordering::Relaxed));
                if new.insert(lo, hi, h, v0, v1) {
                    new.len.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        *current = Arc::new(new);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Room for `n` ids in the arena: where it starts, or `None` when the arena is full (the
    /// reservation is then lost, harmlessly: the arena stays full).
    fn reserve(&self, n: usize) -> Option<usize> {
        let at = self.arena_len.fetch_add(n, Ordering::Relaxed);
        (at + n <= self.arena.len()).then_some(at)
    }

    /// The `n` ids of an entry whose arena start is `at` (as [`Ids::ids`]`[0]` gives it) to
    /// `out`.
    #[inline(never)]
    pub(super) fn extend(&self, out: &mut Vec<u32>, at: u32, n: u32) {
        let (at, n) = (at as usize, n as usize);
        // Written before the slot pointing here was published (its acquire load gave `at`).
        out.extend(
            self.arena[at..at + n]
                .iter()
                .map(|a| a.load(Ordering::Relaxed)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::piece_table::key_of;
    use super::*;

    /// `piece`'s ids as a thread with `view` reads them (at the start of a text).
    fn get(m: &SharedMemo, view: &mut View, piece: &[u8]) -> Option<Vec<u32>> {
        let k = key_of(piece).unwrap();
        let t = m.take_table(view);
        let got = t.get_hashed(k, hash(k));
        SharedMemo::put_table(view, t);
        let ids = got?;
        let mut out = Vec::new();
        if ids.n <= 3 {
            out.extend_from_slice(&ids.ids[..ids.n as usize]);
        } else {
            m.extend(&mut out, ids.ids[0], ids.n);
        }
        Some(out)
    }

    /// Memoise `piece` as a thread would: insert on a miss (twice at most: an insert that
    /// finds the table full grows it instead).
    fn put(m: &SharedMemo, view: &mut View, piece: &[u8], ids: &[u32]) {
        let k = key_of(piece).unwrap();
        for _ in 0..2 {
            if get(m, view, piece).is_none() {
                let t = m.take_table(view);
                m.insert(view, &t, k, hash(k), ids);
                SharedMemo::put_table(view, t);
            }
        }
    }

    fn ids_of(n: u32) -> Vec<u32> {
        (0..n % 7).map(|j| n * 10 + j).collect()
    }

    #[test]
    fn entries_survive_growth_and_are_never_replaced() {
        let (m, mut view) = (SharedMemo::default(), View::default());
        for n in 0..40_000u32 {
            put(&m, &mut view, n.to_string().as_bytes(), &ids_of(n));
        }
        // Two doublings, entries copied (those of more than three ids point into the arena);
        // the last COUNT_BATCH or fewer not counted yet.
        let t = m.take_table(&mut view);
        let len = t.len.load(Ordering::Relaxed);
        assert_eq!(t.bits, FIRST_BITS + 2);
        assert!((40_000 - COUNT_BATCH..=40_000).contains(&len), "{len}");
        // A second insert of a key keeps the first entry (the same ids, for a real piece).
        let k = key_of(b"17").unwrap();
        m.insert(&mut view, &t, k, hash(k), &[1, 2]);
        SharedMemo::put_table(&mut view, t);
        for n in [0u32, 1, 6, 17, 4999, 39_999] {
            assert_eq!(
                get(&m, &mut view, n.to_string().as_bytes()),
                Some(ids_of(n)),
                "{n}"
            );
        }
        assert_eq!(get(&m, &mut view, b"40000"), None);
    }

    #[test]
    fn threads_share_entries() {
        let m = SharedMemo::default();
        std::thread::scope(|s| {
            for t in 0..2u32 {
                let m = &m;
                s.spawn(move || {
                    let mut view = View::default();
                    for n in 0..50_000u32 {
                        let p = format!("p{n}");
                        match get(m, &mut view, p.as_bytes()) {
                            Some(got) => assert_eq!(got, ids_of(n), "thread {t}, {p}"),
                            None => put(m, &mut view, p.as_bytes(), &ids_of(n)),
                        }
                    }
                });
            }
        });
        // No key twice; an insert gives up only when it meets another being written, or
        // while the table is copied.
        let t = m.take_table(&mut View::default());
        let len = t.len.load(Ordering::Relaxed);
        assert!((45_000..=50_000).contains(&len), "{len}");
        let mut view = View::default();
        for n in 0..50_000u32 {
            if let Some(got) = get(&m, &mut view, format!("p{n}").as_bytes()) {
                assert_eq!(got, ids_of(n));
            }
        }
    }
}
