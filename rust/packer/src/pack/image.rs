//! LLaVA images in packing: each `<image>` token ([`IMAGE_TOKEN_ID`]) becomes `image_tokens`
//! patch embeddings at training time, so a sample's length in a pack is its text length plus
//! `image_tokens - 1` per image. With `image_tokens` set, every image must exist and be
//! readable when packing (a bad one is a record error, skippable with `--skip-bad`).

use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use crate::config::PackConfig;
use crate::error::{Error, Result};
use crate::pack::stage::{StagedSample, STAGE_IDS};
use crate::template::encode::IMAGE_TOKEN_ID;

/// Where a record's image path points: under `image_folder` when given (XTuner's
/// `os.path.join(image_folder, image)`), else beside the data file holding the record.
pub(crate) fn resolve(cfg: &PackConfig, data_file: &Path, image: &str) -> PathBuf {
    match &cfg.image_folder {
        Some(folder) => folder.join(image),
        None => data_file.parent().unwrap_or(Path::new("")).join(image),
    }
}

/// With `image_tokens`: the image path to record for a sample (resolved), after checking
/// that the sample's `<image>` tokens match its image and that the file can be read.
/// Without it, the record's path as given, unchecked (text-only LLaVA packing, as before).
pub(crate) fn check_sample(
    cfg: &PackConfig,
    data_file: &Path,
    ids: &[u32],
    image: Option<String>,
) -> std::result::Result<Option<String>, String> {
    if cfg.image_tokens == 0 && cfg.image_folder.is_none() {
        return Ok(image);
    }
    let count = ids.iter().filter(|&&t| t == IMAGE_TOKEN_ID).count();
    let Some(image) = image else {
        if count > 0 {
            return Err("the text has <image> but the record has no \"image\"".into());
        }
        return Ok(None);
    };
    if count != 1 {
        return Err(format!(
            "image {image:?}: expected one <image> in the kept text, found {count} (a \
             record's image goes where its <image> is; truncation may have cut it)"
        ));
    }
    let path = resolve(cfg, data_file, &image);
    let mut head = [0u8; 1];
    let read = std::fs::File::open(&path).and_then(|mut f| f.read(&mut head));
    match read {
        Ok(0) => Err(format!("image {}: empty file", path.display())),
        Ok(_) => Ok(Some(path.to_string_lossy().into_owned())),
        Err(e) => Err(format!("image {}: {e}", path.display())),
    }
}

/// Each staged sample's length in training tokens: text length plus `image_tokens - 1` per
/// image (`images` lists staged indices with an image; one `<image>` each, as checked).
pub(crate) fn expanded_lengths(
    staged: &[StagedSample],
    images: &[u64],
    image_tokens: usize,
) -> Vec<u32> {
    let mut lengths: Vec<u32> = staged.iter().map(|s| s.len).collect();
    if image_tokens > 0 {
        for &j in images {
            lengths[j as usize] += image_tokens as u32 - 1;
        }
    }
    lengths
}

/// The offset of each image's `<image>` token inside its sample, read from the staged ids
/// (`images`: staged indices; `part_dirs`: the parts' staging folders).
pub(crate) fn positions(
    part_dirs: &[&Path],
    staged: &[StagedSample],
    images: &[u64],
) -> Result<Vec<i64>> {
    let mut out = Vec::with_capacity(images.len());
    let mut buf = Vec::new();
    for &j in images {
        let s = &staged[j as usize];
        let p = part_dirs[s.part as usize].join(STAGE_IDS);
        let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        buf.resize(s.len as usize * 4, 0);
        f.read_exact_at(&mut buf, s.offset * 4)
            .map_err(|e| Error::io(&p, e))?;
        let pos = buf
            .chunks_exact(4)
            .position(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == IMAGE_TOKEN_ID);
        out.push(pos.map_or(-1, |p| p as i64));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::binpack::plan_packs;

    fn staged(lens: &[u32]) -> Vec<StagedSample> {
        lens.iter()
            .map(|&len| StagedSample {
                part: 0,
                offset: 0,
                len,
                file: 0,
                record: 0,
                role: 0,
            })
            .collect()
    }

    #[test]
    fn images_count_at_training_length_in_the_plan() {
        // Text lengths alone fit two samples a pack; with 8-token images they do not.
        let s = staged(&[5, 5, 5, 5]);
        let planned = expanded_lengths(&s, &[0, 2], 8);
        assert_eq!(planned, vec![12, 5, 12, 5]);
        for p in plan_packs(&planned, 17, 0).unwrap() {
            let total: u32 = p.iter().map(|&i| planned[i as usize]).sum();
            assert!(total <= 17, "{p:?}");
        }
        assert_eq!(expanded_lengths(&s, &[0, 2], 0), vec![5, 5, 5, 5]);
    }

    #[test]
    fn image_checks_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.json");
        std::fs::write(dir.path().join("a.png"), b"\x89PNG").unwrap();
        std::fs::write(dir.path().join("empty.png"), b"").unwrap();
        let cfg = PackConfig {
            image_tokens: 4,
            ..PackConfig::default()
        };
        let with = [1, IMAGE_TOKEN_ID, 2];
        let ok = check_sample(&cfg, &data, &with, Some("a.png".into())).unwrap();
        assert_eq!(ok, Some(dir.path().join("a.png").to_string_lossy().into()));
        let e = check_sample(&cfg, &data, &with, Some("no.png".into())).unwrap_err();
        assert!(e.contains("no.png"), "{e}");
        let e = check_sample(&cfg, &data, &with, Some("empty.png".into())).unwrap_err();
        assert!(e.contains("empty file"), "{e}");
        let e = check_sample(&cfg, &data, &[1, 2], Some("a.png".into())).unwrap_err();
        assert!(e.contains("found 0"), "{e}");
        let e = check_sample(&cfg, &data, &with, None).unwrap_err();
        assert!(e.contains("no \"image\""), "{e}");
        assert_eq!(check_sample(&cfg, &data, &[1, 2], None).unwrap(), None);
        // without image_tokens: the path as given, unchecked
        let off = PackConfig::default();
        let raw = check_sample(&off, &data, &[1, 2], Some("no.png".into())).unwrap();
        assert_eq!(raw.as_deref(), Some("no.png"));
    }
}
