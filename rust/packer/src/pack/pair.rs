//! A preference pair made to fit one pack: chosen and rejected are packed together, so their
//! lengths together must not exceed `max_length`. Completions are cut from their ends, the
//! longer one first, and both keep their whole prompt; a pair whose two prompts alone leave
//! no room for a trained token on each side, or that trains nothing on one side after the
//! cut, is dropped. Every cut and dropped token is counted by the caller.

use crate::template::encode::Encoded;

/// What became of one pair.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PairFit {
    /// Both sides kept (possibly cut: `Encoded::truncated` says by how much).
    Keep(Encoded, Encoded),
    /// Dropped; the sides as they were when dropped (cut or not) for the counts.
    Drop(Encoded, Encoded),
}

/// Untrained tokens before the completion: the prompt (its length is where the first
/// trained token is; all of the sample when nothing is trained).
fn prompt_len(e: &Encoded) -> usize {
    e.mask.iter().position(|&m| m != 0).unwrap_or(e.ids.len())
}

fn cut(e: &mut Encoded, len: usize) {
    if e.ids.len() > len {
        e.truncated += (e.ids.len() - len) as u64;
        e.ids.truncate(len);
        e.mask.truncate(len);
    }
}

/// Fit the pair (each side encoded whole, untruncated) into `max_length` tokens.
pub(crate) fn fit_pair(mut chosen: Encoded, mut rejected: Encoded, max_length: usize) -> PairFit {
    let (pc, pr) = (prompt_len(&chosen), prompt_len(&rejected));
    let (cc, cr) = (chosen.ids.len() - pc, rejected.ids.len() - pr);
    if pc + cc + pr + cr > max_length {
        // Each side needs at least one completion token to train anything.
        if pc + pr + 2 > max_length {
            return PairFit::Drop(chosen, rejected);
        }
        let budget = max_length - pc - pr;
        // Cut the longer completion first; when both are longer than half the budget, split
        // it evenly (the odd token to chosen).
        let half = budget / 2;
        let (kc, kr) = if cc <= half {
            (cc, budget - cc)
        } else if cr <= half {
            (budget - cr, cr)
        } else {
            (budget - half, half)
        };
        cut(&mut chosen, pc + kc);
        cut(&mut rejected, pr + kr);
    }
    if chosen.trained() == 0 || rejected.trained() == 0 {
        return PairFit::Drop(chosen, rejected);
    }
    PairFit::Keep(chosen, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `prompt` untrained tokens then `completion` trained ones (ids count up from 1).
    fn enc(prompt: usize, completion: usize) -> Encoded {
        let n = prompt + completion;
        Encoded {
            ids: (1..=n as u32).collect(),
            mask: (0..n).map(|i| (i >= prompt) as u8).collect(),
            truncated: 0,
        }
    }

    fn lens(f: &PairFit) -> (usize, usize, u64, u64, bool) {
        let (PairFit::Keep(c, r) | PairFit::Drop(c, r)) = f;
        let keep = matches!(f, PairFit::Keep(..));
        (c.ids.len(), r.ids.len(), c.truncated, r.truncated, keep)
    }

    #[test]
    fn a_pair_that_fits_is_untouched() {
        assert_eq!(
            lens(&fit_pair(enc(3, 4), enc(3, 5), 15)),
            (7, 8, 0, 0, true)
        );
    }

    #[test]
    fn the_longer_completion_is_cut_first_and_prompts_stay_whole() {
        // budget 20 - 6 = 14: chosen keeps its 4, rejected 10 of 30
        assert_eq!(
            lens(&fit_pair(enc(3, 4), enc(3, 30), 20)),
            (7, 13, 0, 20, true)
        );
        assert_eq!(
            lens(&fit_pair(enc(3, 30), enc(3, 4), 20)),
            (13, 7, 20, 0, true)
        );
        // both long: budget 15 split 8 / 7
        assert_eq!(
            lens(&fit_pair(enc(3, 30), enc(3, 40), 21)),
            (11, 10, 22, 33, true)
        );
        if let PairFit::Keep(c, _) = fit_pair(enc(3, 30), enc(3, 40), 21) {
            assert_eq!(&c.mask[..3], &[0, 0, 0]);
        }
    }

    #[test]
    fn prompts_too_long_or_nothing_trained_drop_the_pair() {
        // two prompts of 5 leave 1 token for two completions
        assert_eq!(
            lens(&fit_pair(enc(5, 4), enc(5, 4), 11)),
            (9, 9, 0, 0, false)
        );
        // exactly one token each: kept
        assert_eq!(
            lens(&fit_pair(enc(5, 4), enc(5, 4), 12)),
            (6, 6, 3, 3, true)
        );
        // a side with no trained token at all
        assert!(matches!(
            fit_pair(enc(3, 0), enc(3, 2), 100),
            PairFit::Drop(..)
        ));
    }

    #[test]
    fn the_mask_never_depends_on_token_ids() {
        // id 0 in a completion (Qwen's "!") is trained like any other id
        let mut c = enc(2, 2);
        c.ids[2] = 0;
        let PairFit::Keep(c, _) = fit_pair(c, enc(2, 2), 100) else {
            panic!("kept")
        };
        assert_eq!((c.ids[2], c.mask[2], c.trained()), (0, 1, 2));
    }
}
