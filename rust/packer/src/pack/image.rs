//! LLaVA images in packing: each `<image>` token ([`IMAGE_TOKEN_ID`]) becomes `image_tokens`
//! patch embeddings at training time, so a sample's length in a pack is its text length plus
//! `image_tokens - 1` per image ([`expanded_lengths`]), and each image's position is read
//! from the staged ids ([`positions`]). The per-record checks are in [`super::image_check`].

use std::os::unix::fs::FileExt as _;
use std::path::Path;

use crate::error::{Error, Result};
use crate::pack::stage::{StagedSample, STAGE_TOKENS};
use crate::template::encode::IMAGE_TOKEN_ID;

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

/// The offset of each image's `<image>` token inside its sample, read from the staged tokens
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
        let p = part_dirs[s.part as usize].join(STAGE_TOKENS);
        let f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        // A narrow sample (ids below 65,536) cannot hold the image token.
        let pos = if s.narrow {
            None
        } else {
            buf.resize(s.len as usize * 4, 0);
            f.read_exact_at(&mut buf, s.offset)
                .map_err(|e| Error::io(&p, e))?;
            buf.chunks_exact(4)
                .position(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == IMAGE_TOKEN_ID)
        };
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
                narrow: false,
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
}
