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

/// Alignment of offsets, lengths and buffers of `O_DIRECT` writes (the largest logical block
/// size in use, 4 KiB sectors).
pub(crate) const ALIGN: u64 = 4096;

/// Bytes staged in the aligned buffer per direct write.
const BOUNCE: usize = 1 << 20;

/// A zero-initialised buffer of [`BOUNCE`] bytes aligned to [`ALIGN`].
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
}

// SAFETY: `Aligned` owns its allocation outright (no aliasing); it is plain bytes.
unsafe impl Send for Aligned {}
// SAFETY: shared references only read the bytes.
unsafe impl Sync for Aligned {}

impl Aligned {
    fn layout() -> Layout {
        Layout::from_size_align(BOUNCE, ALIGN as usize).expect("valid layout")
    }

    fn new() -> Self {
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        let ptr = std::ptr::NonNull::new(p)
            .unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout()));
        Aligned { ptr }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `BOUNCE` initialised bytes, borrowed mutably
        // through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), BOUNCE) }
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

/// One direct write handed to the writer thread: the buffer, its bytes used, the offset.
type Job = (Aligned, usize, u64);

/// The thread that writes a file's direct buffers, so that the device's time overlaps the
/// caller's work (an `O_DIRECT` write returns when the device has the bytes).
struct Writer {
    jobs: std::sync::mpsc::Sender<Job>,
    /// Buffers back from the thread, written (or the first error, after which it stops).
    free: std::sync::mpsc::Receiver<std::io::Result<Aligned>>,
    /// Buffers not yet handed out (the rest are in flight).
    spare: Vec<Aligned>,
    thread: std::thread::JoinHandle<()>,
}

/// Positioned writes of one file: the [`ALIGN`]ed middle of each through an `O_DIRECT`
/// descriptor, written by a thread of its own in the order given, the rest through the
/// caller's normal descriptor. [`DirectWrites::finish`] waits for the thread and reports its
/// errors; call it before syncing the file.
pub(crate) struct DirectWrites {
    writer: Option<Writer>,
}

impl DirectWrites {
    /// Direct writes to `path` (which exists) when the filesystem accepts `O_DIRECT`; else
    /// every write goes through the normal descriptor. `PYFAST_TUNE_DIRECT_IO=0` turns direct
    /// writes off.
    pub(crate) fn open(path: &Path) -> Self {
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
        let writer = files.and_then(|(direct, plain)| {
            let (jobs, todo) = std::sync::mpsc::channel::<Job>();
            let (done, free) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name("direct-writes".into())
                .spawn(move || write_jobs(&direct, &plain, &todo, &done))
                .ok()?;
            Some(Writer {
                jobs,
                free,
                spare: (0..BUFFERS).map(|_| Aligned::new()).collect(),
                thread,
            })
        });
        DirectWrites { writer }
    }

    /// Whether writes go through `O_DIRECT`.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.writer.is_some()
    }

    /// Write all of `data` at `offset` of the file whose normal descriptor is `file` (the
    /// direct part may still be in flight: see [`DirectWrites::finish`]). Writes must not
    /// overlap: the bytes of overlapping ones could land in either order.
    pub(crate) fn write_all_at(
        &mut self,
        file: &File,
        data: &[u8],
        offset: u64,
    ) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        let (a, b) = (offset.next_multiple_of(ALIGN), end / ALIGN * ALIGN);
        let Some(w) = self.writer.as_mut().filter(|_| a < b) else {
            return file.write_all_at(data, offset);
        };
        let at = |pos: u64| (pos - offset) as usize;
        file.write_all_at(&data[..at(a)], offset)?;
        let mut pos = a;
        while pos < b {
            let mut buf = match w.spare.pop() {
                Some(buf) => buf,
                None => w.free.recv().map_err(|_| gone())??,
            };
            let n = (b - pos).min(BOUNCE as u64) as usize;
            buf.bytes()[..n].copy_from_slice(&data[at(pos)..at(pos) + n]);
            w.jobs.send((buf, n, pos)).map_err(|_| gone())?;
            pos += n as u64;
        }
        file.write_all_at(&data[at(b)..], b)
    }

    /// Wait for every direct write; the first error of any.
    pub(crate) fn finish(&mut self) -> std::io::Result<()> {
        let Some(w) = self.writer.take() else {
            return Ok(());
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
        thread.join().map_err(|_| gone())?;
        first
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

/// The writer thread: each job's bytes at its offset through `direct`, or through `plain`
/// from the first write the filesystem refuses ([`REFUSED`]) on; each buffer sent back when
/// written. Stops at the first other error, sending it back.
fn write_jobs(
    direct: &File,
    plain: &File,
    todo: &std::sync::mpsc::Receiver<Job>,
    done: &std::sync::mpsc::Sender<std::io::Result<Aligned>>,
) {
    let mut refused = false;
    for (mut buf, n, pos) in todo.iter() {
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

    /// Writes of every alignment (inside one block, across blocks, longer than the bounce
    /// buffer, at and past the end), each byte written once, in a shuffled order, leave the
    /// same bytes as plain positioned writes.
    #[test]
    fn direct_writes_leave_the_bytes_plain_writes_leave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p1, p2) = (dir.path().join("direct"), dir.path().join("plain"));
        let (f1, f2) = (
            File::create(&p1).expect("create"),
            File::create(&p2).expect("create"),
        );
        let mut w = DirectWrites::open(&p1);
        let lens = [
            100usize,
            3996,
            8192,
            3 * BOUNCE + 5,
            1,
            4095,
            2 * 4096,
            12_345,
            17,
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
        let data: Vec<u8> = (0..at as usize).map(|i| (i * 7 + i / 251) as u8).collect();
        for (off, len) in writes {
            let src = &data[off as usize..off as usize + len];
            w.write_all_at(&f1, src, off).expect("direct");
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

    #[test]
    fn without_o_direct_every_write_is_plain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let f = File::create(&p).expect("create");
        let mut w = DirectWrites { writer: None };
        assert!(!w.is_direct());
        w.write_all_at(&f, &[1u8; 10_000], 4096).expect("write");
        drop(f);
        let got = std::fs::read(&p).expect("read");
        assert_eq!(got.len(), 14_096);
        assert!(got[..4096].iter().all(|&b| b == 0) && got[4096..].iter().all(|&b| b == 1));
    }
}
