//! Open-addressing tables keyed by short pieces (up to 15 bytes packed with their length in a
//! `u128`): the shared table of pieces that are one vocabulary token, and the per-thread memo.
//!
//! A probe hashes the key with two multiplies and reads one 32-byte slot per step of a linear
//! probe (key and value side by side, half the slots empty at most), so a hit costs one cache
//! line; `hashbrown`'s SIMD groups and `FxHash` of a `u128` cost more for this key shape. The key
//! of a piece inside a longer text is one unaligned 16-byte load and a mask ([`key_in`]).

/// The key of a piece of at most 15 bytes: its bytes little-endian, zero-padded, with the
/// length in the last byte (never 0 for a non-empty piece).
#[inline]
pub(super) fn key_of(p: &[u8]) -> Option<u128> {
    if p.is_empty() || p.len() > 15 {
        return None;
    }
    let mut b = [0u8; 16];
    b[..p.len()].copy_from_slice(p);
    b[15] = p.len() as u8;
    Some(u128::from_le_bytes(b))
}

/// The low `n` bytes of a `u128` set, for `n` in 0..16: a table, since a shift of a `u128` by a
/// variable amount compiles to branches (it may cross the two 64-bit halves).
const KEY_MASKS: [u128; 16] = {
    let mut t = [0u128; 16];
    let mut n = 1;
    while n < 16 {
        t[n] = (1u128 << (8 * n)) - 1;
        n += 1;
    }
    t
};

/// [`key_of`] for `text[i..j]`, reading the 16 bytes at `i` at once when the text has them.
#[inline]
pub(super) fn key_in(text: &[u8], i: usize, j: usize) -> Option<u128> {
    let n = j - i;
    // `n` in 1..=15 (0 wraps around).
    if n.wrapping_sub(1) >= 15 {
        return None;
    }
    match text.get(i..i + 16) {
        Some(w) => {
            let w = u128::from_le_bytes(w.try_into().expect("16 bytes"));
            Some((w & KEY_MASKS[n & 15]) | ((n as u128) << 120))
        }
        None => key_of(&text[i..j]),
    }
}

/// Ask the CPU to bring the cache line of `x` in (a hint: no effect on what the program does).
#[inline(always)]
pub(super) fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing into the program and cannot fault; `x` is a live reference.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((x as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// The size of a transparent huge page.
const HUGE: usize = 2 << 20;

/// A fixed-length slice of a table of megabytes, on 2 MB pages where the kernel grants them
/// (Linux transparent huge pages in `madvise` mode). Such a table probed at random misses the
/// TLB on nearly every probe with 4 kB pages, and under virtualisation each miss is a
/// two-level page walk that cost more than the cache miss itself. The allocation is aligned to
/// 2 MB so that all of it can be huge pages (a `Vec` of the allocator's large blocks starts
/// 16 bytes past a page: of a 4 MB table only one 2 MB page could be huge).
pub(crate) struct HugeSlice<T> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
}

// SAFETY: a `HugeSlice` owns its values as a `Box<[T]>` would.
unsafe impl<T: Send> Send for HugeSlice<T> {}
// SAFETY: shared access gives only `&[T]`.
unsafe impl<T: Sync> Sync for HugeSlice<T> {}

impl<T> HugeSlice<T> {
    fn layout(len: usize) -> std::alloc::Layout {
        let bytes = std::mem::size_of::<T>()
            .checked_mul(len)
            .expect("table size");
        let align = if bytes >= HUGE {
            HUGE
        } else {
            std::mem::align_of::<T>()
        };
        std::alloc::Layout::from_size_align(bytes, align).expect("table layout")
    }

    /// `n` values made by `f`, in order.
    pub(crate) fn with(n: usize, mut f: impl FnMut() -> T) -> Self {
        let layout = Self::layout(n);
        if layout.size() == 0 {
            for _ in 0..n {
                std::mem::forget(f());
            }
            return HugeSlice {
                ptr: std::ptr::NonNull::dangling(),
                len: n,
            };
        }
        // SAFETY: a layout of non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let ptr = std::ptr::NonNull::new(raw.cast::<T>())
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        #[cfg(target_os = "linux")]
        if layout.size() >= HUGE {
            // SAFETY: the whole 2 MB pages of the allocation just made, not yet written (so
            // they can be faulted in as huge ones); MADV_HUGEPAGE changes only how the kernel
            // backs them, never their contents or validity. A refusal is harmless.
            unsafe {
                libc::madvise(raw.cast(), layout.size() / HUGE * HUGE, libc::MADV_HUGEPAGE);
            }
        }
        for i in 0..n {
            // SAFETY: `i < n` values fit the allocation; each written once, in order. Should
            // `f` panic, the values written so far leak and the memory with them (no drop of
            // uninitialised values).
            unsafe { ptr.as_ptr().add(i).write(f()) };
        }
        HugeSlice { ptr, len: n }
    }
}

impl<T: Clone> HugeSlice<T> {
    /// `n` copies of `fill`.
    pub(crate) fn filled(n: usize, fill: T) -> Self {
        Self::with(n, || fill.clone())
    }
}

impl<T: Clone> Clone for HugeSlice<T> {
    fn clone(&self) -> Self {
        let mut it = self.iter();
        Self::with(self.len, || it.next().expect("same length").clone())
    }
}

impl<T> std::ops::Deref for HugeSlice<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` values written by `with`, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> std::ops::DerefMut for HugeSlice<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for HugeSlice<T> {
    fn drop(&mut self) {
        let layout = Self::layout(self.len);
        // SAFETY: the `len` values written by `with`, dropped once, then the allocation made
        // there with this layout (none for a zero-size one).
        unsafe {
            std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                self.ptr.as_ptr(),
                self.len,
            ));
            if layout.size() != 0 {
                std::alloc::dealloc(self.ptr.as_ptr().cast(), layout);
            }
        }
    }
}

/// The hash of a key (its high bits index the tables).
#[inline]
pub(super) fn hash(k: u128) -> u64 {
    let (lo, hi) = (k as u64, (k >> 64) as u64);
    (lo.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ hi).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// A map from piece keys to `V`, growing to keep at most half its slots full.
#[derive(Clone)]
pub(super) struct PieceTable<V: Copy + Default> {
    slots: HugeSlice<(u128, V)>,
    shift: u32,
    len: usize,
}

impl<V: Copy + Default> Default for PieceTable<V> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<V: Copy + Default> PieceTable<V> {
    /// A table holding `n` keys without growing.
    pub(super) fn with_capacity(n: usize) -> Self {
        let slots = (2 * n).next_power_of_two().max(16);
        PieceTable {
            slots: HugeSlice::filled(slots, (0, V::default())),
            shift: 64 - slots.trailing_zeros(),
            len: 0,
        }
    }

    /// Number of keys.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub(super) fn get(&self, k: u128) -> Option<V> {
        self.get_hashed(k, hash(k))
    }

    /// [`PieceTable::get`] of `k` whose [`hash`] is `h`.
    #[inline]
    pub(super) fn get_hashed(&self, k: u128, h: u64) -> Option<V> {
        let mask = self.slots.len() - 1;
        let mut i = (h >> self.shift) as usize;
        loop {
            let (key, v) = self.slots[i];
            if key == k {
                return Some(v);
            }
            if key == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Prefetch the first slot a lookup of a key of hash `h` reads ([`prefetch`]).
    #[inline]
    pub(super) fn prefetch_hash(&self, h: u64) {
        prefetch(&self.slots[(h >> self.shift) as usize]);
    }

    /// Insert or replace the value of `k` (a key from [`key_of`], never 0).
    pub(super) fn insert(&mut self, k: u128, v: V) {
        debug_assert!(k != 0);
        if 2 * (self.len + 1) > self.slots.len() {
            let old = std::mem::replace(self, Self::with_capacity(self.slots.len()));
            for &(key, val) in old.slots.iter().filter(|s| s.0 != 0) {
                self.insert(key, val);
            }
        }
        let mask = self.slots.len() - 1;
        let mut i = (hash(k) >> self.shift) as usize;
        loop {
            let slot = &mut self.slots[i];
            if slot.0 == k {
                slot.1 = v;
                return;
            }
            if slot.0 == 0 {
                *slot = (k, v);
                self.len += 1;
                return;
            }
            i = (i + 1) & mask;
        }
    }
}

/// A map from a pair of token ids (`left << 32 | right`) to (merge rank, merged id): the BPE
/// merges, probed for every adjacent pair of a piece being merged. One 16-byte slot holds key
/// and value (four to a cache line), on huge pages, at most three quarters full.
#[derive(Clone)]
pub(crate) struct PairTable {
    slots: HugeSlice<(u64, u32, u32)>,
    shift: u32,
    len: usize,
}

/// The key no pair has (the table's empty slot): a pair of two ids `u32::MAX`, which callers
/// refuse before [`PairTable::insert`].
pub(crate) const NO_PAIR: u64 = u64::MAX;

impl Default for PairTable {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl PairTable {
    /// A table holding `n` pairs without growing.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let slots = (n * 4 / 3 + 1).next_power_of_two().max(16);
        PairTable {
            slots: HugeSlice::filled(slots, (NO_PAIR, 0, 0)),
            shift: 64 - slots.trailing_zeros(),
            len: 0,
        }
    }

    /// Number of pairs.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn slot(&self, k: u64) -> usize {
        (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// (rank, merged id) of pair `k`.
    #[inline]
    pub(crate) fn get(&self, k: u64) -> Option<(u32, u32)> {
        let mask = self.slots.len() - 1;
        let mut i = self.slot(k);
        loop {
            let (key, rank, id) = self.slots[i];
            if key == k {
                return Some((rank, id));
            }
            if key == NO_PAIR {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Prefetch the first slot a lookup of `k` reads ([`prefetch`]).
    #[inline]
    pub(crate) fn prefetch(&self, k: u64) {
        prefetch(&self.slots[self.slot(k)]);
    }

    /// Insert or replace (a pair listed twice keeps its later rank, as `tokenizers` does).
    pub(crate) fn insert(&mut self, k: u64, v: (u32, u32)) {
        assert!(k != NO_PAIR, "token ids are below u32::MAX");
        if 4 * (self.len + 1) > 3 * self.slots.len() {
            let old = std::mem::replace(self, Self::with_capacity(2 * self.len + 2));
            for &(key, rank, id) in old.slots.iter().filter(|s| s.0 != NO_PAIR) {
                self.insert(key, (rank, id));
            }
        }
        let mask = self.slots.len() - 1;
        let mut i = self.slot(k);
        loop {
            let slot = &mut self.slots[i];
            if slot.0 == k {
                (slot.1, slot.2) = v;
                return;
            }
            if slot.0 == NO_PAIR {
                *slot = (k, v.0, v.1);
                self.len += 1;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Every (pair, (rank, merged id)), in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, (u32, u32))> + '_ {
        self.slots
            .iter()
            .filter(|s| s.0 != NO_PAIR)
            .map(|&(k, rank, id)| (k, (rank, id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_text_equal_keys_of_pieces() {
        let text = b"hello, world: a longer text than sixteen bytes";
        for i in 0..text.len() {
            for j in i..=text.len() {
                assert_eq!(key_in(text, i, j), key_of(&text[i..j]), "{i}..{j}");
            }
        }
        assert_eq!(key_of(b""), None);
        assert_eq!(key_of(&[0u8; 16]), None);
        // A piece of NUL bytes still has a non-zero key (its length).
        assert_ne!(key_of(&[0u8; 3]), Some(0));
        assert_ne!(key_of(b"ab"), key_of(b"ab\0"));
    }

    #[test]
    fn huge_slices_are_aligned_filled_cloned_and_dropped() {
        let t = HugeSlice::filled(HUGE / 8 + 3, 7u64);
        assert_eq!(
            t.as_ptr() as usize % HUGE,
            0,
            "a table of 2 MB or more starts a page"
        );
        assert!(t.len() == HUGE / 8 + 3 && t.iter().all(|&v| v == 7));
        let mut c = t.clone();
        c[5] = 9;
        assert_eq!((t[5], c[5], c.len()), (7, 9, t.len()));
        let small = HugeSlice::filled(3, 1u32);
        assert_eq!(&small[..], &[1, 1, 1]);
        assert!(HugeSlice::filled(0, 1u128).is_empty());
        // Values that need dropping are dropped once each, clones included.
        let counted = std::rc::Rc::new(());
        let mut n = 0;
        let d = HugeSlice::with(5, || {
            n += 1;
            (n, std::rc::Rc::clone(&counted))
        });
        assert_eq!(d.iter().map(|v| v.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        let e = d.clone();
        assert_eq!(std::rc::Rc::strong_count(&counted), 11);
        drop((d, e));
        assert_eq!(std::rc::Rc::strong_count(&counted), 1);
    }

    #[test]
    fn pair_table_grows_and_replaces() {
        let mut t = PairTable::default();
        for n in 0..5000u64 {
            t.insert(n << 32 | (n * 7), (n as u32, 1));
        }
        t.insert(3 << 32 | 21, (9, 9));
        assert_eq!(t.len(), 5000);
        assert_eq!(t.get(3 << 32 | 21), Some((9, 9)));
        assert_eq!(t.get(0), Some((0, 1)));
        assert_eq!(t.get(4999 << 32 | (4999 * 7)), Some((4999, 1)));
        assert_eq!(t.get(1), None);
        assert_eq!(t.iter().count(), 5000);
    }

    #[test]
    fn table_grows_and_replaces() {
        let mut t = PieceTable::<u32>::default();
        for n in 0..5000u32 {
            t.insert(key_of(n.to_string().as_bytes()).unwrap(), n);
        }
        t.insert(key_of(b"17").unwrap(), 99);
        assert_eq!(t.len(), 5000);
        assert_eq!(t.get(key_of(b"17").unwrap()), Some(99));
        assert_eq!(t.get(key_of(b"4999").unwrap()), Some(4999));
        assert_eq!(t.get(key_of(b"5000").unwrap()), None);
    }
}
