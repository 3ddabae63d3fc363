//! The record-level image checks of LLaVA packing: with `image_tokens` set, every image must
//! exist and be readable when packing (a bad one is a record error, skippable with
//! `--skip-bad`). A leaf: staging calls it, and [`super::image`] (which reads what staging
//! wrote) does not come back here.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::config::PackConfig;
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

#[cfg(test)]
mod tests {
    use super::*;

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
