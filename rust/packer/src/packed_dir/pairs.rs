//! Check of a preference directory's `pairs.bin` against its sample table: every pair id
//! `0..P` names exactly two samples, chosen (role 0) right before rejected (role 1), adjacent
//! in one pack. Losses pair segments by this file, never by parity, so it must hold.

use std::path::Path;

use crate::error::{Error, Result};

/// Check `pairs` (`(pair id, role)` per sample) against `samples` (`(start, length, pack,
/// file, record)` per sample); returns the number of pairs.
pub(crate) fn check_pairs(path: &Path, pairs: &[i64], samples: &[i64]) -> Result<u64> {
    let corrupt = |msg: String| Error::Corrupt {
        path: path.to_path_buf(),
        msg,
    };
    let n = samples.len() / 5;
    if pairs.len() != 2 * n {
        return Err(corrupt(format!(
            "{} rows, expected one per sample ({n})",
            pairs.len() / 2
        )));
    }
    let n_pairs = n / 2;
    // chosen sample of each pair id, once seen
    let mut chosen: Vec<Option<usize>> = vec![None; n_pairs];
    let mut rejected = vec![false; n_pairs];
    for s in 0..n {
        let (id, role) = (pairs[2 * s], pairs[2 * s + 1]);
        let slot = usize::try_from(id).ok().filter(|&i| i < n_pairs);
        let Some(i) = slot else {
            return Err(corrupt(format!(
                "sample {s}: pair id {id} outside 0..{n_pairs}"
            )));
        };
        match role {
            0 if chosen[i].is_none() => chosen[i] = Some(s),
            1 if !rejected[i] => {
                let Some(c) = chosen[i] else {
                    return Err(corrupt(format!(
                        "pair {i}: rejected sample {s} before its chosen"
                    )));
                };
                let (cr, rr) = (&samples[5 * c..5 * c + 5], &samples[5 * s..5 * s + 5]);
                if cr[2] != rr[2] || cr[0] + cr[1] != rr[0] {
                    return Err(corrupt(format!(
                        "pair {i}: chosen sample {c} and rejected sample {s} are not adjacent \
                         in one pack"
                    )));
                }
                rejected[i] = true;
            }
            _ => {
                return Err(corrupt(format!(
                    "sample {s}: pair {id} role {role} (0 chosen, 1 rejected) is out of place"
                )))
            }
        }
    }
    if !n.is_multiple_of(2) || rejected.iter().any(|&r| !r) {
        return Err(corrupt("a pair lacks its rejected sample".into()));
    }
    Ok(n_pairs as u64)
}
