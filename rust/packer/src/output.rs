//! The packed directory (docs/FORMAT.md): staged in a temporary sibling directory, renamed
//! into place only when complete, so a crash leaves no directory that opens.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Version of the on-disk format written in `meta.json`.
pub const FORMAT_VERSION: u64 = 1;
/// Token ids, `<u4`, pack order.
pub const INPUT_IDS: &str = "input_ids.bin";
/// Loss mask, `u1`, pack order.
pub const LOSS_MASK: &str = "loss_mask.bin";
/// Per-sample table, `<i8` (N, 5).
pub const SAMPLES: &str = "samples.bin";
/// Pack boundaries, `<i8` (P+1, 2).
pub const PACKS: &str = "packs.bin";
/// Sample ids in pack order, `<i8` (N,).
pub const PACK_SAMPLES: &str = "pack_samples.bin";
/// Metadata, fingerprint, statistics and output hashes.
pub const META: &str = "meta.json";
/// The binary files, in the order they are written.
pub const BINARY_FILES: &[&str] = &[INPUT_IDS, LOSS_MASK, SAMPLES, PACKS, PACK_SAMPLES];

/// A file being written with its BLAKE3 and size tracked as bytes go out.
pub struct HashedWriter {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    size: u64,
}

impl HashedWriter {
    /// Create (truncate) `path`.
    pub fn create(path: PathBuf) -> Result<Self> {
        let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(HashedWriter {
            path,
            out: BufWriter::with_capacity(1 << 20, f),
            hasher: blake3::Hasher::new(),
            size: 0,
        })
    }

    /// Append bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Append little-endian i64 values.
    pub fn write_i64s(&mut self, vals: &[i64]) -> Result<()> {
        for v in vals {
            self.write(&v.to_le_bytes())?;
        }
        Ok(())
    }

    /// Flush and fsync; returns (size, hex BLAKE3).
    pub fn finish(self) -> Result<(u64, String)> {
        let f = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok((self.size, self.hasher.finalize().to_hex().to_string()))
    }
}

/// A temporary directory next to the destination, removed on drop unless committed.
pub struct StagingDir {
    /// The temporary directory.
    pub dir: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Create `<dest>.tmp-<pid>-<nanos>` beside `dest`.
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
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = parent.join(format!(
            ".{}.tmp-{}-{nanos}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(StagingDir {
            dir,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Move the finished directory into place. An existing destination is replaced only if it
    /// is a packed directory (has `meta.json`) or empty; anything else is refused.
    pub fn commit(mut self) -> Result<()> {
        sync_dir(&self.dir)?;
        let dest = self.dest.clone();
        if dest.exists() {
            let is_packed = dest.join(META).is_file();
            let is_empty = dest.is_dir()
                && std::fs::read_dir(&dest)
                    .map_err(|e| Error::io(&dest, e))?
                    .next()
                    .is_none();
            if !is_packed && !is_empty {
                return Err(Error::Config(format!(
                    "refusing to replace {}: it exists and is not a pyfast-tune packed directory",
                    dest.display()
                )));
            }
            let old = self.dir.with_extension("old");
            std::fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
            std::fs::rename(&self.dir, &dest).map_err(|e| Error::io(&dest, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.dir, &dest).map_err(|e| Error::io(&dest, e))?;
        }
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        self.committed = true;
        Ok(())
    }
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
