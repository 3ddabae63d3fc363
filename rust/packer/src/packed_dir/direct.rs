//! Writes of the packed token files that bypass the page cache where the filesystem allows
//! (`O_DIRECT`).
//!
//! `input_ids.bin` and `loss_mask.bin` are written once, read by another process later (the
//! training run, through its own memory map), and are the bulk of what a pack or a merge writes
//! (5 bytes per token). Written through the page cache, every byte is copied by the kernel into
//! a page it must first allocate and zero, and later write back; measured on this project's
//! 2-core VM, 2 GB written with `pwrite` took 5.7 s (5.0 s of system CPU: fresh guest pages
//! cost the hypervisor a fault each) against 0.7-0.8 s (0.13 s of CPU) with `O_DIRECT`. The
//! aligned middle of each write goes straight to the device from an aligned buffer; its
//! unaligned ends (and any write where `O_DIRECT` cannot be opened or is refused: tmpfs, some
//! network filesystems) go through the normal descriptor, so the bytes are the same either way.
//! Durability is unchanged: the caller still fsyncs the file (its metadata, and the parts
//! written through the page cache).

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;

use crate::packed_dir::treehash::{BlockHasher, Share};

/// Alignment of offsets, lengths and buffers of `O_DIRECT` writes (the largest logical block
/// size in use, 4 KiB sectors).
pub(crate) const ALIGN: u64 = 4096;

/// Bytes of a [`Buffer`], the most one direct write writes (1 MiB: smaller writes were
/// slower here, 256 KiB ones ~1.4 GB/s against ~2 GB/s).
pub(crate) const BUFFER_BYTES: usize = 1 << 20;

/// A buffer of [`BUFFER_BYTES`] from [`DirectWrites::buffer`], filled in place by the caller
/// and handed back by [`DirectWrites::write_buffer`].
pub(crate) struct Buffer(Inner);

enum Inner {
    /// Direct writes: the writer thread writes it as it is.
    Aligned(Aligned),
    /// Writes through the page cache.
    Plain(Box<[u8]>),
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Inner::Aligned(a) => a.get(),
            Inner::Plain(p) => p,
        }
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Inner::Aligned(a) => a.bytes(),
            Inner::Plain(p) => p,
        }
    }
}

/// A zero-initialised buffer of [`BUFFER_BYTES`] bytes aligned to [`ALIGN`].
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
}

// SAFETY: `Aligned` owns its allocation outright (no aliasing); it is plain bytes.
unsafe impl Send for Aligned {}
// SAFETY: shared references only read the bytes.
unsafe impl Sync for Aligned {}

impl Aligned {
    fn layout() -> Layout {
        Layout::from_size_align(BUFFER_BYTES, ALIGN as usize).expect("valid layout")
    }

    fn new() -> Self {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        let ptr = std::ptr::NonNull::new(p)
            .unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout()));
        Aligned { ptr }
    }

    fn get(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `BUFFER_BYTES` initialised bytes, borrowed
        // through `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), BUFFER_BYTES) }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `BUFFER_BYTES` initialised bytes, borrowed mutably
        // through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), BUFFER_BYTES) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout()) }
    }
}

/// Give `f` its final size `len` with its blocks allocated where the filesystem can
/// (`fallocate`): direct writes from several processes then overwrite allocated blocks, which
/// ext4 lets them do at once (a direct write into a hole takes the file's lock exclusively:
/// two range workers' writes went one after the other), and a full disk fails here, not
/// halfway through the copy. Elsewhere a sparse file of that size.
pub(crate) fn allocate(f: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    if len > 0 {
        // SAFETY: a plain syscall on an open descriptor; it reads no memory of ours.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSPC) {
            return Err(e);
        }
    }
    f.set_len(len)
}

/// Buffers in flight per file: one being filled while the others are written.
const BUFFERS: usize = 3;

/// One buffer handed to the writer thread: the buffer, its bytes written directly (from its
/// start), its bytes in all (hashed when the thread hashes), the file offset of its start.
type Job = (Aligned, usize, usize, u64);

/// The thread that writes a file's direct buffers, so that the device's time overlaps the
/// caller's work (an `O_DIRECT` write returns when the device has the bytes).
struct Writer {
    jobs: std::sync::mpsc::Sender<Job>,
    /// Buffers back from the thread, written (or the first error, after which it stops).
    free: std::sync::mpsc::Receiver<std::io::Result<Aligned>>,
    /// Buffers not yet handed out (the rest are in flight).
    spare: Vec<Aligned>,
    /// Gives back its hasher of the bytes.
    thread: std::thread::JoinHandle<BlockHasher>,
}

/// Positioned writes of one file: the [`ALIGN`]ed middle of each through an `O_DIRECT`
/// descriptor, written by a thread of its own in the order given, the rest through the
/// caller's normal descriptor. [`DirectWrites::finish`] waits for the thread and reports its
/// errors; call it before syncing the file.
pub(crate) struct DirectWrites {
    writer: Option<Writer>,
    /// The buffer of writes that are not direct, reused.
    plain: Option<Box<[u8]>>,
    /// The hasher when the writes are not direct (the caller's thread hashes; with a writer
    /// thread, that thread has it).
    hasher: Option<BlockHasher>,
}

impl DirectWrites {
    /// Direct writes to `path` (which exists) when the filesystem accepts `O_DIRECT`; else
    /// every write goes through the normal descriptor. `PYFAST_TUNE_DIRECT_IO=0` turns direct
    /// writes off. The bytes of every buffer given to [`DirectWrites::write_buffer`] (which
    /// must come in file order, with no gap) are hashed into `hasher`: on the writer thread,
    /// before it writes them (there the hash costs the caller nothing: that thread waits on
    /// the device anyway), or without `O_DIRECT` on the caller's. [`DirectWrites::finish`]
    /// gives what was hashed.
    pub(crate) fn open(path: &Path, hasher: BlockHasher) -> Self {
        let off = std::env::var("PYFAST_TUNE_DIRECT_IO").is_ok_and(|v| v == "0");
        let files = (!off)
            .then(|| {
                let direct = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .ok()?;
                let plain = OpenOptions::new().write(true).open(path).ok()?;
                Some((direct, plain))
            })
            .flatten();
        let mut hasher = Some(hasher);
        let writer = files.and_then(|(direct, plain)| {
            let (jobs, todo) = std::sync::mpsc::channel::<Job>();
            let (done, free) = std::sync::mpsc::channel();
            // A copy: if the thread cannot start, the caller hashes.
            let thread_hasher = hasher.clone();
            let thread = std::thread::Builder::new()
                .name("direct-writes".into())
                .spawn(move || {
                    let mut hasher = thread_hasher.expect("given above");
                    write_jobs(&direct, &plain, &todo, &done, &mut hasher);
                    hasher
                })
                .ok()?;
            hasher = None;
            Some(Writer {
                jobs,
                free,
                spare: (0..BUFFERS).map(|_| Aligned::new()).collect(),
                thread,
            })
        });
        DirectWrites {
            writer,
            plain: None,
            hasher,
        }
    }

    /// An empty buffer of [`BUFFER_BYTES`] to fill and give to [`DirectWrites::write_buffer`]:
    /// aligned when writes are direct, so its bytes go to the device with no further copy.
    /// Waits for a buffer in flight when all are (the first error of the writer thread).
    pub(crate) fn buffer(&mut self) -> std::io::Result<Buffer> {
        Ok(Buffer(match self.writer.as_mut() {
            Some(w) => match w.spare.pop() {
                Some(buf) => Inner::Aligned(buf),
                None => Inner::Aligned(w.free.recv().map_err(|_| gone())??),
            },
            None => Inner::Plain(
                self.plain
                    .take()
                    .unwrap_or_else(|| vec![0; BUFFER_BYTES].into_boxed_slice()),
            ),
        }))
    }

    /// Write the first `n` bytes of `buf` at `offset` of the file whose normal descriptor is
    /// `file`, and take the buffer back. From an offset that is a multiple of [`ALIGN`], the
    /// aligned part is written directly by the writer thread (it may still be in flight: see
    /// [`DirectWrites::finish`]) and the unaligned end through `file`; from any other offset
    /// all of it through `file`. Writes must not overlap: the bytes of overlapping ones could
    /// land in either order.
    pub(crate) fn write_buffer(
        &mut self,
        file: &File,
        buf: Buffer,
        n: usize,
        offset: u64,
    ) -> std::io::Result<()> {
        assert!(n <= BUFFER_BYTES, "{n} bytes in a buffer of {BUFFER_BYTES}");
        match (buf.0, self.writer.as_mut()) {
            (Inner::Aligned(mut a), Some(w)) => {
                let m = if offset.is_multiple_of(ALIGN) {
                    n / ALIGN as usize * ALIGN as usize
                } else {
                    0
                };
                file.write_all_at(&a.bytes()[m..n], offset + m as u64)?;
                w.jobs.send((a, m, n, offset)).map_err(|_| gone())
            }
            // Aligned buffers come from the writer, which is there until `finish`.
            (Inner::Aligned(_), None) => Err(gone()),
            (Inner::Plain(p), _) => {
                if let Some(h) = &mut self.hasher {
                    h.update(&p[..n]);
                }
                let r = file.write_all_at(&p[..n], offset);
                self.plain = Some(p);
                r
            }
        }
    }

    /// Wait for every direct write; the first error of any, else what was hashed (the
    /// second call: an error).
    pub(crate) fn finish(&mut self) -> std::io::Result<Share> {
        let Some(w) = self.writer.take() else {
            return (self.hasher.take().map(BlockHasher::finish)).ok_or_else(gone);
        };
        let Writer {
            jobs, free, thread, ..
        } = w;
        drop(jobs);
        let mut first = Ok(());
        for r in free.iter() {
            if let (Err(e), Ok(())) = (r, &first) {
                first = Err(e);
            }
        }
        let hasher = thread.join().map_err(|_| gone())?;
        first.map(|()| hasher.finish())
    }
}

impl Drop for DirectWrites {
    fn drop(&mut self) {
        // Only an abandoned output gets here unfinished; its errors no longer matter.
        let _ = self.finish();
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("the direct-write thread stopped")
}

/// Errors of a direct write that mean the filesystem refuses it (`EINVAL`: alignment;
/// `EOPNOTSUPP`/`ENOTSUP`: support), not that the bytes could not be written.
const REFUSED: [i32; 3] = [libc::EINVAL, libc::EOPNOTSUPP, libc::ENOTSUP];

/// The writer thread: each job's bytes hashed into `hasher` when there is one, then its direct
/// part written at its offset through `direct`, or through `plain` from the first write the
/// filesystem refuses ([`REFUSED`]) on; each buffer sent back when written. Stops at the first
/// other error, sending it back.
fn write_jobs(
    direct: &File,
    plain: &File,
    todo: &std::sync::mpsc::Receiver<Job>,
    done: &std::sync::mpsc::Sender<std::io::Result<Aligned>>,
    hasher: &mut BlockHasher,
) {
    let mut refused = false;
    for (mut buf, n, all, pos) in todo.iter() {
        hasher.update(&buf.get()[..all]);
        if n == 0 {
            if done.send(Ok(buf)).is_err() {
                return;
            }
            continue;
        }
        let bytes = &buf.bytes()[..n];
        let mut r = if refused {
            plain.write_all_at(bytes, pos)
        } else {
            direct.write_all_at(bytes, pos)
        };
        if matches!(&r, Err(e) if e.raw_os_error().is_some_and(|c| REFUSED.contains(&c))) {
            refused = true;
            r = plain.write_all_at(bytes, pos);
        }
        let failed = r.is_err();
        if done.send(r.map(|()| buf)).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Write `data` at `offset` through buffers, as a caller fills them.
    fn write_through(w: &mut DirectWrites, f: &File, data: &[u8], offset: u64) {
        for (k, piece) in data.chunks(BUFFER_BYTES).enumerate() {
            let mut buf = w.buffer().expect("buffer");
            buf[..piece.len()].copy_from_slice(piece);
            let at = offset + (k * BUFFER_BYTES) as u64;
            w.write_buffer(f, buf, piece.len(), at).expect("write");
        }
    }

    /// Buffers of every alignment of offset and length (inside one block, across blocks, a
    /// whole buffer, at and past the end), each byte written once, in a shuffled order,
    /// leave the same bytes as plain positioned writes.
    #[test]
    fn direct_writes_leave_the_bytes_plain_writes_leave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p1, p2) = (dir.path().join("direct"), dir.path().join("plain"));
        let (f1, f2) = (
            File::create(&p1).expect("create"),
            File::create(&p2).expect("create"),
        );
        let mut w = DirectWrites::open(&p1, BlockHasher::whole());
        let lens = [
            100usize,
            3996,
            8192,
            3 * BUFFER_BYTES + 5,
            BUFFER_BYTES,
            1,
            4095,
            2 * 4096,
            12_345,
            0,
            17,
            BUFFER_BYTES - 5,
            4096,
        ];
        let mut at = 0u64;
        let mut writes: Vec<(u64, usize)> = Vec::new();
        for len in lens {
            writes.push((at, len));
            at += len as u64;
        }
        writes.swap(0, 5);
        writes.swap(2, 8);
        writes.swap(4, 11);
        let data: Vec<u8> = (0..at as usize).map(|i| (i * 7 + i / 251) as u8).collect();
        for (off, len) in writes {
            let src = &data[off as usize..off as usize + len];
            write_through(&mut w, &f1, src, off);
            f2.write_all_at(src, off).expect("plain");
        }
        w.finish().expect("finish");
        drop((f1, f2));
        let (a, b) = (
            std::fs::read(&p1).expect("read"),
            std::fs::read(&p2).expect("read"),
        );
        assert_eq!(a.len(), b.len());
        assert!(
            a == b,
            "first difference at byte {:?}",
            a.iter().zip(&b).position(|(x, y)| x != y)
        );
        assert_eq!(a, data);
    }

    /// A hashing writer hashes every buffer's bytes in order (on its thread where the writes
    /// are direct), the unaligned end and a buffer shorter than a block included: the hash
    /// of the file's bytes.
    #[test]
    fn a_hashing_writer_gives_the_hash_of_the_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("hashed");
        let f = File::create(&p).expect("create");
        let mut w = DirectWrites::open(&p, BlockHasher::whole());
        let data: Vec<u8> = (0..3 * BUFFER_BYTES + 5000)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut at = 0;
        for n in [BUFFER_BYTES, 100, BUFFER_BYTES, BUFFER_BYTES, 0, 4900] {
            let mut buf = w.buffer().expect("buffer");
            buf[..n].copy_from_slice(&data[at..at + n]);
            w.write_buffer(&f, buf, n, at as u64).expect("write");
            at += n;
        }
        assert_eq!(at, data.len());
        let hash = w.finish().expect("finish");
        assert_eq!(std::fs::read(&p).expect("read"), data);
        assert!(matches!(hash, Share::Whole(h) if h == blake3::hash(&data)));
    }

    #[test]
    fn without_o_direct_every_write_is_plain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let f = File::create(&p).expect("create");
        let mut w = DirectWrites {
            writer: None,
            plain: None,
            hasher: Some(BlockHasher::whole()),
        };
        write_through(&mut w, &f, &[1u8; 10_000], 4096);
        // The caller's thread hashed it.
        let hashed = w.finish().expect("finish");
        assert!(matches!(hashed, Share::Whole(h) if h == blake3::hash(&[1u8; 10_000])));
        drop(f);
        let got = std::fs::read(&p).expect("read");
        assert_eq!(got.len(), 14_096);
        assert!(got[..4096].iter().all(|&b| b == 0) && got[4096..].iter().all(|&b| b == 1));
    }
}
