//! Atomic writing of a packed directory: staged in a temporary sibling directory, renamed
//! into place only when complete, so a crash leaves no directory that opens.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::packed_dir::layout::META;

/// A file being written with its BLAKE3 and size tracked as bytes go out.
///
/// Bytes gather in one buffer that is hashed and written whole when full: BLAKE3 hashes a
/// large update several 1 KiB chunks at a time with SIMD, while the many small writes of
/// per-sample rows (8 to 40 bytes) would each be hashed on their own, several times slower.
pub struct HashedWriter {
    path: PathBuf,
    out: File,
    buf: Vec<u8>,
    /// None: a file nobody checks by its hash ([`HashedWriter::staged`]).
    hasher: Option<blake3::Hasher>,
    size: u64,
    /// Bytes written to the file (the rest of `size` is in `buf`).
    on_file: u64,
    /// Bytes whose writeback was started ([`start_writeback`]).
    flushed: u64,
    /// Whether the file must reach the disk ([`HashedWriter::staged`] scratch files: no).
    durable: bool,
}

/// Bytes written between two [`start_writeback`] calls of a writer.
pub(crate) const WRITEBACK_BYTES: u64 = 8 << 20;

/// Start writing `len` bytes at `offset` of `f` to disk without waiting (Linux
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`; elsewhere nothing): the fsync that commits the
/// file then finds most of it written while the tokens were still being produced, instead of
/// waiting for all of it at the end. A hint: errors surface at that fsync.
pub(crate) fn start_writeback(f: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd as _;
        // SAFETY: a plain syscall on an open descriptor; it reads no memory of ours.
        unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, offset, len);
}

impl HashedWriter {
    /// Create (truncate) `path`.
    pub fn create(path: PathBuf) -> Result<Self> {
        Self::with_capacity(path, 1 << 20)
    }

    /// Create (truncate) `path`, buffering `capacity` bytes.
    pub fn with_capacity(path: PathBuf, capacity: usize) -> Result<Self> {
        let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(HashedWriter {
            path,
            out: f,
            buf: Vec::with_capacity(capacity.max(1 << 12)),
            hasher: Some(blake3::Hasher::new()),
            size: 0,
            on_file: 0,
            flushed: 0,
            durable: true,
        })
    }

    /// A writer of staged tokens: not hashed (nothing checks staged tokens by a hash: their
    /// lengths and offsets are recorded beside them, and the packed files are hashed as they
    /// are written; [`HashedWriter::finish`] gives an empty hash). `durable`: a shard's part,
    /// read by another process, maybe after this one is gone, must reach the disk. Otherwise a
    /// scratch file, read back and deleted by this process before anything is committed (a
    /// single run's): no writeback is started and `finish` does not fsync, so its bytes need
    /// never be written to the disk.
    pub fn staged(path: PathBuf, durable: bool) -> Result<Self> {
        let mut w = Self::create(path)?;
        w.durable = durable;
        w.hasher = None;
        Ok(w)
    }

    /// `n` more bytes went to the file: start the writeback of what went out since the last
    /// start, every [`WRITEBACK_BYTES`].
    fn written(&mut self, n: usize) {
        self.on_file += n as u64;
        if self.durable && self.on_file - self.flushed >= WRITEBACK_BYTES {
            start_writeback(&self.out, self.flushed, self.on_file - self.flushed);
            self.flushed = self.on_file;
        }
    }

    /// Hash and write out the buffered bytes.
    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Some(h) = &mut self.hasher {
            h.update(&self.buf);
        }
        self.out
            .write_all(&self.buf)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written(self.buf.len());
        self.buf.clear();
        Ok(())
    }

    /// Append bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.size += bytes.len() as u64;
        if self.buf.len() + bytes.len() > self.buf.capacity() {
            self.flush_buf()?;
            if bytes.len() >= self.buf.capacity() {
                // large: hashed and written straight from the caller's slice
                if let Some(h) = &mut self.hasher {
                    h.update(bytes);
                }
                self.out
                    .write_all(bytes)
                    .map_err(|e| Error::io(&self.path, e))?;
                self.written(bytes.len());
                return Ok(());
            }
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// Append little-endian i64 values.
    pub fn write_i64s(&mut self, vals: &[i64]) -> Result<()> {
        for v in vals {
            self.write(&v.to_le_bytes())?;
        }
        Ok(())
    }

    /// Flush and fsync (not a scratch file); returns (size, hex BLAKE3).
    pub fn finish(self) -> Result<(u64, String)> {
        let mut done = Self::finish_all(vec![self])?;
        Ok(done.pop().expect("one writer"))
    }

    /// [`HashedWriter::finish`] of several files, their fsyncs concurrent: each waits for a
    /// journal commit, and the filesystem makes one commit serve the fsyncs waiting on it
    /// (ext4 here: five fsyncs one after another were ~3.5 ms each).
    pub fn finish_all(writers: Vec<HashedWriter>) -> Result<Vec<(u64, String)>> {
        let mut writers = writers;
        for w in &mut writers {
            w.flush_buf()?;
        }
        let durable: Vec<&HashedWriter> = writers.iter().filter(|w| w.durable).collect();
        std::thread::scope(|s| {
            let syncs: Vec<_> = (durable.iter().skip(1))
                .map(|w| s.spawn(move || w.sync()))
                .collect();
            let first = durable.first().map_or(Ok(()), |w| w.sync());
            syncs.into_iter().fold(first, |r, h| {
                let other = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                r.and(other)
            })
        })?;
        Ok(writers
            .into_iter()
            .map(|w| {
                let hash = w.hasher.map(|h| h.finalize().to_hex().to_string());
                (w.size, hash.unwrap_or_default())
            })
            .collect())
    }

    fn sync(&self) -> Result<()> {
        self.out.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

/// A temporary directory next to the destination, removed on drop unless committed.
///
/// Its name, `.<dest>.tmp-<host>-<pid>-<nanos>`, says who owns it: a staging directory left
/// by a process of this host that is gone (killed, crashed) is removed by the next
/// [`StagingDir::new`] for the same destination.
pub struct StagingDir {
    /// The temporary directory.
    pub dir: PathBuf,
    dest: PathBuf,
    committed: bool,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().replace(['/', '-'], "_"))
        .unwrap_or_default()
}

/// Is `pid` a live process of this host? (`kill(pid, 0)`: EPERM means alive, not ours.)
#[cfg(unix)]
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 performs only the existence and permission checks; no signal is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn pid_alive(_pid: u32) -> bool {
    true // Unknown: never remove another process's directory.
}

/// Remove staging directories of `dest` left by dead processes of this host.
fn remove_stale(parent: &Path, name: &str) -> usize {
    let prefix = format!(".{name}.tmp-");
    let host = host_name();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let fname = entry.file_name();
        let Some(rest) = fname.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        // <host>-<pid>-<nanos>; the host has no '-' (replaced when the name was made).
        let mut parts = rest.rsplitn(3, '-');
        let (_nanos, pid, owner) = (parts.next(), parts.next(), parts.next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if owner != Some(host.as_str()) || pid_alive(pid) {
            continue;
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

impl StagingDir {
    /// Create `.<dest>.tmp-<host>-<pid>-<nanos>` beside `dest`, first removing the staging
    /// directories of `dest` that dead processes of this host left behind.
    pub fn new(dest: &Path) -> Result<Self> {
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let name = dest.file_name().ok_or_else(|| {
            Error::Config(format!(
                "output path {} has no directory name",
                dest.display()
            ))
        })?;
        let name = name.to_string_lossy();
        remove_stale(&parent, &name);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = parent.join(format!(
            ".{name}.tmp-{}-{}-{nanos}",
            host_name(),
            std::process::id()
        ));
        std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(StagingDir {
            dir,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Leave the directory for other processes to fill (a merge in ranges): not removed on
    /// drop; [`StagingDir::adopt`] takes it up again to commit it.
    pub fn keep(mut self) -> PathBuf {
        self.committed = true;
        self.dir.clone()
    }

    /// The staging directory `dir` of `dest` made by [`StagingDir::new`] and kept.
    pub fn adopt(dir: PathBuf, dest: PathBuf) -> Self {
        StagingDir {
            dir,
            dest,
            committed: false,
        }
    }

    /// Move the finished directory into place. An existing destination is replaced only if it
    /// is a packed directory (has `meta.json`) or empty; anything else is refused.
    ///
    /// On Linux the replacement is one `renameat2(RENAME_EXCHANGE)`: at every instant the
    /// destination is either the old whole directory or the new one, and two packers
    /// committing the same destination at once leave one of their results whole (the last
    /// to commit). Elsewhere (or on filesystems without RENAME_EXCHANGE) the old directory is
    /// renamed aside first, leaving a moment with no destination, never a partial one.
    pub fn commit(mut self) -> Result<()> {
        sync_dir(&self.dir)?;
        let dest = self.dest.clone();
        // A few rounds: another packer may create or replace `dest` between our look and
        // our rename; each round re-checks what is there now.
        for _ in 0..16 {
            match std::fs::symlink_metadata(&dest) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    match rename_noreplace(&self.dir, &dest) {
                        Ok(()) => {
                            self.committed = true;
                            break;
                        }
                        // Someone committed first: replace theirs on the next round.
                        Err(e) if is_exists(&e) => continue,
                        Err(e) => return Err(Error::io(&dest, e)),
                    }
                }
                Err(e) => return Err(Error::io(&dest, e)),
                Ok(_) => {
                    check_replaceable(&dest)?;
                    match rename_exchange(&self.dir, &dest) {
                        Ok(()) => {
                            // `self.dir` now holds the previous output; it goes on drop.
                            self.committed = true;
                            let _ = std::fs::remove_dir_all(&self.dir);
                            break;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) if is_unsupported(&e) => {
                            self.replace_aside(&dest)?;
                            break;
                        }
                        Err(e) => return Err(Error::io(&dest, e)),
                    }
                }
            }
        }
        if !self.committed {
            return Err(Error::io(
                &dest,
                std::io::Error::other("destination kept changing under concurrent writers"),
            ));
        }
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(())
    }

    /// Portable fallback: rename the old destination aside, the new one in, drop the old.
    fn replace_aside(&mut self, dest: &Path) -> Result<()> {
        let mut old = self.dir.clone().into_os_string();
        old.push(".old");
        let old = PathBuf::from(old);
        std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
        std::fs::rename(&self.dir, dest).map_err(|e| Error::io(dest, e))?;
        self.committed = true;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}

fn check_replaceable(dest: &Path) -> Result<()> {
    let is_packed = dest.join(META).is_file();
    let is_empty = dest.is_dir()
        && std::fs::read_dir(dest)
            .map_err(|e| Error::io(dest, e))?
            .next()
            .is_none();
    if is_packed || is_empty {
        return Ok(());
    }
    Err(Error::OutputExists {
        path: dest.to_path_buf(),
    })
}

fn is_exists(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AlreadyExists
        || e.kind() == std::io::ErrorKind::DirectoryNotEmpty
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

#[cfg(target_os = "linux")]
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; AT_FDCWD
    // makes relative paths resolve as rename(2) would.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Swap the directories (or files) `a` and `b` atomically, as the commit of a packed
/// directory does. `Ok(false)` where the platform or filesystem has no `RENAME_EXCHANGE`, so
/// the caller can fall back to renaming aside; other failures are errors. The training
/// checkpoints use this through the Python binding.
pub fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    match rename_exchange(a, b) {
        Ok(()) => Ok(true),
        Err(e) if is_unsupported(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Atomically swap `from` and `to` (both must exist).
#[cfg(target_os = "linux")]
fn rename_exchange(from: &Path, to: &Path) -> std::io::Result<()> {
    renameat2(from, to, libc::RENAME_EXCHANGE)
}

#[cfg(not(target_os = "linux"))]
fn rename_exchange(_from: &Path, _to: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

/// Rename `from` to `to`, failing with `AlreadyExists` if `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    match renameat2(from, to, libc::RENAME_NOREPLACE) {
        Err(e) if is_unsupported(&e) => {}
        r => return r,
    }
    // rename(2) replaces only an empty directory and fails on a non-empty one, which the
    // caller's next round handles.
    std::fs::rename(from, to)
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed_dir::layout::INPUT_IDS;

    fn stage(dest: &Path, tag: &str) -> Result<()> {
        let s = StagingDir::new(dest)?;
        std::fs::write(s.dir.join(META), tag).unwrap();
        std::fs::write(s.dir.join(INPUT_IDS), tag.repeat(1000)).unwrap();
        s.commit()
    }

    #[test]
    fn commit_creates_then_replaces_packed_and_refuses_foreign() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        stage(&dest, "a").unwrap();
        assert_eq!(std::fs::read_to_string(dest.join(META)).unwrap(), "a");
        stage(&dest, "b").unwrap();
        assert_eq!(std::fs::read_to_string(dest.join(META)).unwrap(), "b");
        // Nothing but `out` is left: the old output and the staging dirs are gone.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out"]);
        let foreign = d.path().join("home");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), "keep").unwrap();
        let e = stage(&foreign, "c").unwrap_err();
        assert!(e.to_string().contains("refusing to replace"), "{e}");
        assert_eq!(
            std::fs::read_to_string(foreign.join("notes.txt")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn stale_staging_of_dead_process_is_removed_live_one_kept() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        let host = host_name();
        // A pid above the kernel's pid_max (4194304) is never alive.
        let dead = d.path().join(format!(".out.tmp-{host}-4194305-1"));
        let dead_old = d.path().join(format!(".out.tmp-{host}-4194305-1.old"));
        let live = d
            .path()
            .join(format!(".out.tmp-{host}-{}-2", std::process::id()));
        let other_host = d.path().join(".out.tmp-elsewhere-4194305-3");
        let other_dest = d.path().join(format!(".outer.tmp-{host}-4194305-4"));
        for p in [&dead, &dead_old, &live, &other_host, &other_dest] {
            std::fs::create_dir(p).unwrap();
            std::fs::write(p.join(INPUT_IDS), b"x").unwrap();
        }
        stage(&dest, "a").unwrap();
        assert!(!dead.exists() && !dead_old.exists());
        assert!(live.exists() && other_host.exists() && other_dest.exists());
    }

    #[test]
    fn concurrent_commits_leave_one_whole_result() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        for round in 0..20 {
            let tags: Vec<String> = (0..4).map(|t| format!("r{round}t{t}")).collect();
            std::thread::scope(|sc| {
                for tag in &tags {
                    let dest = &dest;
                    sc.spawn(move || stage(dest, tag).unwrap());
                }
            });
            let meta = std::fs::read_to_string(dest.join(META)).unwrap();
            assert!(tags.contains(&meta), "{meta}");
            let ids = std::fs::read_to_string(dest.join(INPUT_IDS)).unwrap();
            assert_eq!(ids, meta.repeat(1000), "files of different writers mixed");
        }
        let left = std::fs::read_dir(d.path()).unwrap().count();
        assert_eq!(left, 1, "staging or old directories left behind");
    }
}
