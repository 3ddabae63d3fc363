//! XTuner's `encode_fn`, token for token: each piece tokenized on its own without special
//! tokens; BOS before a turn when the previous turn ended with EOS (or it is the first);
//! input labels -100; output labels = ids (or -100 without `output_with_loss`); EOS after the
//! output when `need_eos_token` (trained iff the output is); SEP after the turn, untrained;
//! truncation to `max_length`.

use crate::format::Turn;
use crate::tokenize::TextTokenizer;

/// One encoded sample: token ids and a per-token loss mask (1 = label is the id, 0 = -100).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, at most `max_length`.
    pub ids: Vec<u32>,
    /// 1 where the token is trained.
    pub mask: Vec<u8>,
    /// Tokens cut off by truncation.
    pub truncated: u64,
}

impl Encoded {
    fn push(&mut self, ids: &[u32], trained: bool) {
        self.ids.extend_from_slice(ids);
        self.mask
            .extend(std::iter::repeat_n(trained as u8, ids.len()));
    }

    /// Tokenize `text` straight into the sample: no vector per piece (one per piece showed in
    /// profiles).
    fn push_text(&mut self, tok: &TextTokenizer, text: &str, trained: bool) -> Result<(), String> {
        let start = self.ids.len();
        tok.encode_into(text, &mut self.ids)?;
        let n = self.ids.len() - start;
        self.mask.extend(std::iter::repeat_n(trained as u8, n));
        Ok(())
    }

    /// Number of trained tokens.
    pub fn trained(&self) -> usize {
        self.mask.iter().filter(|&&m| m != 0).count()
    }
}

/// Encode templated turns. Errors only when the tokenizer fails or an EOS is required but the
/// tokenizer has none.
pub fn encode_turns(
    tok: &TextTokenizer,
    turns: &[Turn],
    max_length: usize,
) -> Result<Encoded, String> {
    encode_turns_opts(tok, turns, max_length, false)
}

/// The ids a model sees at generation time: every turn but the last encoded as in training,
/// then the last turn's BOS (when due) and input, stopping where its answer would start.
pub fn encode_prompt(tok: &TextTokenizer, turns: &[Turn]) -> Result<Vec<u32>, String> {
    let Some((last, done)) = turns.split_last() else {
        return Ok(Vec::new());
    };
    let mut enc = encode_turns(tok, done, usize::MAX)?;
    if done.last().is_none_or(|t| t.need_eos_token) {
        enc.push(&tok.bos, false);
    }
    enc.push_text(tok, &last.input, false)?;
    Ok(enc.ids)
}

/// Id written in place of `<image>` in a LLaVA input: XTuner's `IMAGE_TOKEN_INDEX` (-200)
/// as a `<u4` (read `input_ids.bin` as `<i4` to see -200).
pub const IMAGE_TOKEN_ID: u32 = (-200i32) as u32;

/// [`encode_turns`] with XTuner's `with_image_token`: an input holding `<image>` is split
/// there, the two halves tokenized on their own and joined by [`IMAGE_TOKEN_ID`] (untrained).
/// More than one `<image>` in one input is an error, as XTuner asserts.
pub fn encode_turns_opts(
    tok: &TextTokenizer,
    turns: &[Turn],
    max_length: usize,
    with_image_token: bool,
) -> Result<Encoded, String> {
    let mut enc = Encoded::default();
    let mut needs_bos = true;
    for turn in turns {
        let text = TurnText {
            input: &turn.input,
            output: &turn.output,
            output_with_loss: turn.output_with_loss,
            need_eos_token: turn.need_eos_token,
            sep: &turn.sep,
        };
        needs_bos = enc.push_turn(tok, &text, needs_bos, with_image_token)?;
    }
    enc.truncate(max_length);
    Ok(enc)
}

/// The texts and flags of one templated turn, borrowed (see [`Turn`]).
pub struct TurnText<'s> {
    /// User text, template applied (no loss).
    pub input: &'s str,
    /// Assistant text, template suffix included.
    pub output: &'s str,
    /// Whether the output (and its EOS) is trained.
    pub output_with_loss: bool,
    /// Whether an EOS token follows the output.
    pub need_eos_token: bool,
    /// Text after the turn, untrained.
    pub sep: &'s str,
}

impl Encoded {
    /// Append one turn as `encode_fn` does (BOS first when `needs_bos`); returns whether the
    /// next turn needs a BOS (this one ended with EOS).
    pub fn push_turn(
        &mut self,
        tok: &TextTokenizer,
        turn: &TurnText<'_>,
        needs_bos: bool,
        with_image_token: bool,
    ) -> Result<bool, String> {
        if needs_bos {
            self.push(&tok.bos, false);
        }
        // Only LLaVA inputs are searched for `<image>`.
        match with_image_token
            .then(|| turn.input.split_once("<image>"))
            .flatten()
        {
            Some((a, b)) => {
                if b.contains("<image>") {
                    return Err("more than one <image> in one turn's input".into());
                }
                self.push_text(tok, a, false)?;
                self.push(&[IMAGE_TOKEN_ID], false);
                self.push_text(tok, b, false)?;
            }
            _ => self.push_text(tok, turn.input, false)?,
        }
        self.push_text(tok, turn.output, turn.output_with_loss)?;
        let next_needs_bos = if turn.need_eos_token {
            if tok.eos.is_empty() {
                return Err(
                    "the template needs an EOS token but the tokenizer has none (eos_token in tokenizer_config.json)"
                        .into(),
                );
            }
            self.push(&tok.eos, turn.output_with_loss);
            true
        } else {
            false
        };
        if !turn.sep.is_empty() {
            self.push_text(tok, turn.sep, false)?;
        }
        Ok(next_needs_bos)
    }

    /// Cut to `max_length` tokens, counting what was cut.
    pub fn truncate(&mut self, max_length: usize) {
        if self.ids.len() > max_length {
            self.truncated = (self.ids.len() - max_length) as u64;
            self.ids.truncate(max_length);
            self.mask.truncate(max_length);
        }
    }
}
