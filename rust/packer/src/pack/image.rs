//! LLaVA images in packing: each `<image>` token ([`IMAGE_TOKEN_ID`]) becomes `image_tokens`
//! patch embeddings at training time, so a sample's length in a pack is its text length plus
//! `image_tokens - 1` per image ([`expanded_lengths`]); each image's position in its sample
//! is found while staging ([`crate::pack::stage::Part::images`]). The per-record checks are in
//! [`super::image_check`].

use crate::pack::stage::StagedSample;
#[cfg(doc)]
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
