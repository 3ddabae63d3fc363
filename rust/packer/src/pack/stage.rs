//! The encode stage: stream each input's records in bounded batches, map the format, apply
//! the template, tokenize in parallel (results kept in input order) and append every sample's
//! tokens to a part's staging files. Only per-sample lengths and offsets stay in memory.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::config::PackConfig;
use crate::error::{Error, Result};
use crate::format::openai;
use crate::format::preference::pair_records;
use crate::format::xtuner::{llava_image, Columns};
use crate::format::Format;
use crate::input::InputFile;
use crate::pack::fingerprint::{file_entry, pretok_entry};
use crate::pack::numbering::{self, skip, RecordFault, Site};
use crate::pack::pair::{fit_pair, PairFit};
use crate::pack::stats::{PackStats, Progress};
use crate::packed_dir::atomic::HashedWriter;
use crate::packed_dir::treehash::{self, hash_share, Share, BLAKE3_BLOCKS, SHARE_PROBE};
use crate::source::fetch::{ensure, Fetch};
use crate::source::pretokenized::{self, is_pretokenized, PretokFile};
use crate::source::raw::hash_file;
use crate::source::record::{OwnedRecord, Unreadable};
use crate::source::span::Span;
use crate::source::RecordStream;
use crate::template::chat::{self, ChatTemplate};
use crate::template::encode::{encode_turns_opts, Encoded, TurnText, IMAGE_TOKEN_ID};
use crate::template::Template;
use crate::tokenize::TextTokenizer;

/// Records encoded per parallel batch: large enough to amortise scheduling, small enough
/// to bound memory and report progress often.
const CHUNK: usize = 4096;
pub(crate) use crate::pack::numbering::MAX_SKIP_EXAMPLES;
/// Staged tokens of a part, samples in input order, each as its ids followed by its loss
/// mask as bits ([`pack_mask_bits`]): [`staged_bytes`] per sample. A sample whose ids are all
/// below 65,536 (every sample of a 32-64 k vocabulary) keeps them as `<u2` (*narrow*, about
/// 2.13 bytes per token), any other as `<u4` (about 4.13). A writer copying a sample into the
/// packed files reads it with one positioned read (its ids and mask lie together), and reads
/// an eighth of the mask's bytes and, for a narrow sample, half of the ids' bytes.
pub(crate) const STAGE_TOKENS: &str = "stage_tokens.tmp";

/// Bytes per staged id: 2 for a narrow sample, else 4.
pub(crate) fn id_bytes(narrow: bool) -> usize {
    if narrow {
        2
    } else {
        4
    }
}

/// Bytes of a staged sample of `len` tokens: its ids, then one bit per token.
pub(crate) fn staged_bytes(len: u32, narrow: bool) -> u64 {
    id_bytes(narrow) as u64 * len as u64 + (len as u64).div_ceil(8)
}

/// Staged ids (`<u2` when `narrow`, else `<u4`) as the packed files' `<u4` into `out`
/// (`4 * n` bytes for `n` ids).
pub(crate) fn widen_ids(staged: &[u8], narrow: bool, out: &mut [u8]) {
    if narrow {
        // Eight ids at a time in fixed-size arrays, which the compiler widens with SIMD.
        let (mut o8, mut i8) = (out.chunks_exact_mut(32), staged.chunks_exact(16));
        for (o, i) in (&mut o8).zip(&mut i8) {
            let (o, i): (&mut [u8; 32], &[u8; 16]) = (
                o.try_into().expect("32 bytes"),
                i.try_into().expect("16 bytes"),
            );
            for k in 0..8 {
                o[4 * k..4 * k + 4].copy_from_slice(&[i[2 * k], i[2 * k + 1], 0, 0]);
            }
        }
        let rest = i8.remainder().chunks_exact(2);
        for (o, i) in o8.into_remainder().chunks_exact_mut(4).zip(rest) {
            o.copy_from_slice(&[i[0], i[1], 0, 0]);
        }
    } else {
        out.copy_from_slice(staged);
    }
}

/// The loss mask `mask` (0s and 1s) as bits into `bits` (`len.div_ceil(8)` bytes): token `j`
/// at bit `j % 8` of byte `j / 8`. False when a value is neither 0 nor 1.
pub(crate) fn pack_mask_bits(mask: &[u8], bits: &mut [u8]) -> bool {
    let mut any = 0u8;
    for (b, m) in bits.iter_mut().zip(mask.chunks(8)) {
        *b = m
            .iter()
            .enumerate()
            .fold(0u8, |acc, (j, &x)| acc | (x & 1) << j);
        any |= m.iter().fold(0u8, |acc, &x| acc | x);
    }
    any <= 1
}

/// One byte (0 or 1) per bit of a bitmap byte, little-endian in a `u64`.
const UNPACK: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            t[b] |= (((b >> j) & 1) as u64) << (8 * j);
            j += 1;
        }
        b += 1;
    }
    t
};

/// The mask of tokens `from..from + out.len()` from its bits ([`pack_mask_bits`]).
pub(crate) fn unpack_mask_bits(bits: &[u8], from: usize, out: &mut [u8]) {
    if from.is_multiple_of(8) {
        let bits = &bits[from / 8..];
        let whole = out.len() / 8;
        let mut chunks = out.chunks_exact_mut(8);
        for (o, &b) in (&mut chunks).zip(bits) {
            o.copy_from_slice(&UNPACK[b as usize].to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let b = bits[whole];
            let n = rest.len();
            rest.copy_from_slice(&UNPACK[b as usize].to_le_bytes()[..n]);
        }
    } else {
        for (i, o) in out.iter_mut().enumerate() {
            let j = from + i;
            *o = (bits[j / 8] >> (j % 8)) & 1;
        }
    }
}

/// How turns become text: XTuner prompt template, the tokenizer's chat template, or none.
pub enum Templating {
    /// Turns used as they are.
    None,
    /// An XTuner `PROMPT_TEMPLATE`.
    Xtuner(&'static Template),
    /// The tokenizer's Jinja chat template (`--template hf`).
    Hf(Box<ChatTemplate>),
}

/// What one record became: None when the format maps it to no conversation.
type Encodedrecord = Option<RecordOut>;

/// A record's samples.
enum RecordOut {
    /// One sample: (sample, tokens before truncation, image path).
    Sample(Encoded, u64, Option<String>),
    /// A preference pair: chosen and rejected, each encoded whole (not yet fitted).
    Pair(Encoded, Encoded, Option<f32>),
}

/// Role of a staged sample: SFT samples have none; a pair's two samples are staged adjacent,
/// chosen first.
pub(crate) const ROLE_NONE: u8 = 0;
/// The chosen side of a pair.
pub(crate) const ROLE_CHOSEN: u8 = 1;
/// The rejected side of a pair (always right after its chosen sample).
pub(crate) const ROLE_REJECTED: u8 = 2;

/// Everything the encoders share.
pub(crate) struct Run<'a> {
    pub(crate) cfg: &'a PackConfig,
    /// Format and columns of each mix source (one entry without a mix).
    pub(crate) sources: Vec<SourceView>,
    /// The source of each input file (global file index → index into `sources`).
    pub(crate) file_source: Vec<u32>,
    pub(crate) templating: Templating,
    pub(crate) tok: TextTokenizer,
    pub(crate) pool: rayon::ThreadPool,
    /// Asked for every byte range of an input before it is read ([`Fetch`]).
    pub(crate) fetch: Option<Fetch>,
}

impl Run<'_> {
    /// The format and columns that apply to input file `fi`.
    fn view(&self, fi: usize) -> &SourceView {
        &self.sources[self.file_source.get(fi).copied().unwrap_or(0) as usize]
    }
}

/// How the records of one source are read: its format (`auto`: detected per file) and
/// column remapping.
pub(crate) struct SourceView {
    pub(crate) format: Format,
    pub(crate) columns: Columns,
}

impl SourceView {
    fn parse(&self, text: &str) -> std::result::Result<Value, RecordFault> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| RecordFault::Json(e.to_string()))?;
        Ok(self.remap(value))
    }

    /// Apply `--columns` to a record.
    fn remap(&self, mut value: Value) -> Value {
        if !self.columns.is_empty() {
            self.columns.apply(&mut value);
        }
        value
    }

    /// A record of a batch: parsed from its text, or (a row of a columnar or CSV file) the
    /// value the reader built, taken out of the batch.
    fn record_value(&self, rec: &mut OwnedRecord) -> std::result::Result<Value, RecordFault> {
        match (rec.value.take(), &rec.text) {
            (Some(v), _) => Ok(self.remap(v.into_value())),
            (None, Ok(text)) => self.parse(text),
            (None, Err(Unreadable::Row(m))) => Err(RecordFault::Shape(m.clone())),
            (None, Err(Unreadable::Json(m))) => Err(RecordFault::Json(m.clone())),
        }
    }

    /// The format of a file from one of its records (None: the record is not JSON, detect
    /// from the next one).
    fn detect(&self, path: &Path, rec: &OwnedRecord) -> Result<Option<Format>> {
        let (value, start) = match (&rec.value, &rec.text) {
            (Some(v), _) => {
                let v = v.clone().into_value();
                let start = v.to_string();
                (self.remap(v), start)
            }
            (None, Ok(text)) => match self.parse(text) {
                Ok(v) => (v, text.clone()),
                Err(_) => return Ok(None),
            },
            (None, Err(_)) => return Ok(None),
        };
        Format::detect(&value).map(Some).ok_or_else(|| Error::Record {
            path: path.to_path_buf(),
            line: rec.line,
            record: rec.index,
            msg: format!(
                "cannot detect the format from this record's keys (see `pyfast-tune formats`; \
                 e.g. \"conversation\", \"messages\", \"conversations\", \"instruction\"+\"output\", \
                 \"text\"): pass --format or --columns; record starts {:?}",
                start.chars().take(80).collect::<String>()
            ),
        })
    }
}

thread_local! {
    /// A turn's templated input and output text, and the arena of a record's decoded
    /// strings ([`openai::turns`]), reused from record to record.
    static TURN_TEXT: std::cell::RefCell<(String, String, String)> = Default::default();
}

impl Run<'_> {
    /// An `openai` record read from its text without a `Value` tree ([`openai::turns`]) and
    /// encoded with its template rendered into reused buffers. `None` when this path does not
    /// apply (another format, `--columns`, `--template hf`, a row value) or declines the record
    /// (an unusual shape, any error): the `Value` path then gives the same sample and owns
    /// every error message.
    fn encode_openai_text(
        &self,
        sv: &SourceView,
        rec: &OwnedRecord,
        format: Format,
    ) -> Option<Encodedrecord> {
        if format != Format::OpenAi || !sv.columns.is_empty() || rec.value.is_some() {
            return None;
        }
        let template = match &self.templating {
            Templating::None => None,
            Templating::Xtuner(t) => Some(*t),
            Templating::Hf(_) => return None,
        };
        let text = rec.text.as_ref().ok()?;
        TURN_TEXT.with(|cell| {
            let (input, output, arena) = &mut *cell.borrow_mut();
            let turns = openai::turns(text, arena)?;
            if turns.is_empty() {
                return Some(None);
            }
            let arena: &str = arena;
            // Room for the tokens from the start (JSON text holds over 4 bytes a token in
            // the corpora we measure), not grown token by token.
            let room = text.len() / 4 + 64;
            let mut enc = Encoded {
                ids: Vec::with_capacity(room),
                mask: Vec::with_capacity(room),
                truncated: 0,
            };
            let mut needs_bos = true;
            for (i, t) in turns.iter().enumerate() {
                // What `Template::apply` makes of the turn (system text is dropped without a
                // template, as `encode_turns` never reads it).
                let text = match template {
                    Some(tpl) => {
                        input.clear();
                        tpl.render_input(i, t.system.get(arena), t.input.get(arena), input)
                            .ok()?;
                        output.clear();
                        output.push_str(t.output.get(arena));
                        output.push_str(tpl.suffix);
                        TurnText {
                            input,
                            output,
                            output_with_loss: t.output_with_loss,
                            need_eos_token: !tpl.suffix_as_eos,
                            sep: tpl.sep,
                        }
                    }
                    None => TurnText {
                        input: t.input.get(arena),
                        output: t.output.get(arena),
                        output_with_loss: t.output_with_loss,
                        need_eos_token: true,
                        sep: "",
                    },
                };
                needs_bos = enc.push_turn(&self.tok, &text, needs_bos, false).ok()?;
            }
            enc.truncate(self.cfg.max_length);
            let raw_len = enc.ids.len() as u64 + enc.truncated;
            Some(Some(RecordOut::Sample(enc, raw_len, None)))
        })
    }

    fn encode_record(
        &self,
        value: Value,
        format: Format,
    ) -> std::result::Result<Encodedrecord, RecordFault> {
        if format == Format::Preference {
            return self.encode_pair(&value).map(Some);
        }
        self.encode_sample(value, format, self.cfg.max_length)
    }

    /// One SFT sample, truncated to `max_length`.
    fn encode_sample(
        &self,
        value: Value,
        format: Format,
        max_length: usize,
    ) -> std::result::Result<Encodedrecord, RecordFault> {
        let image = if format == Format::Llava {
            llava_image(&value).map_err(RecordFault::Shape)?
        } else {
            None
        };
        // Pretraining text is never wrapped in a prompt template (XTuner's pretrain configs
        // set template_map_fn=None), so one --template serves a mixed directory.
        let templating = if format == Format::Pretrain {
            &Templating::None
        } else {
            &self.templating
        };
        let tools = chat::tools_of(&value).map_err(RecordFault::Shape)?;
        if tools.is_some() && !matches!(templating, Templating::Hf(_)) {
            return Err(RecordFault::Shape(
                "this record has \"tools\": tool schemas are rendered by the model's own chat \
                 template; pack with --template hf"
                    .into(),
            ));
        }
        let enc = match templating {
            Templating::Hf(ct) => {
                let messages = if format == Format::OpenAi {
                    chat::messages_from_openai(&value).map_err(RecordFault::Shape)?
                } else {
                    let turns = format.to_turns(&value).map_err(RecordFault::Shape)?;
                    chat::messages_from_turns(&turns)
                };
                if messages.is_empty() {
                    return Ok(None);
                }
                ct.encode(&self.tok, &messages, tools.as_ref(), max_length)
                    .map_err(RecordFault::Shape)?
            }
            t => {
                let mut turns = format.to_turns(&value).map_err(RecordFault::Shape)?;
                if turns.is_empty() {
                    return Ok(None);
                }
                if let Templating::Xtuner(t) = t {
                    t.apply(&mut turns).map_err(RecordFault::Shape)?;
                }
                encode_turns_opts(&self.tok, &turns, max_length, format == Format::Llava)
                    .map_err(RecordFault::Shape)?
            }
        };
        let raw_len = enc.ids.len() as u64 + enc.truncated;
        Ok(Some(RecordOut::Sample(enc, raw_len, image)))
    }

    /// Encode both sides of a preference record whole, each as an `openai` conversation
    /// (prompt untrained, completion trained) with the run's template; the fit to
    /// `max_length` is the stager's.
    fn encode_pair(&self, value: &Value) -> std::result::Result<RecordOut, RecordFault> {
        let obj = value.as_object().ok_or_else(|| {
            RecordFault::Shape("a preference record must be a JSON object".into())
        })?;
        let sides = pair_records(obj).map_err(RecordFault::Shape)?;
        let side = |record: &Value| -> std::result::Result<Encoded, RecordFault> {
            let out = match self.encode_sample(record.clone(), Format::OpenAi, usize::MAX)? {
                Some(RecordOut::Sample(enc, _, _)) => enc,
                _ => Encoded::default(),
            };
            Ok(out)
        };
        Ok(RecordOut::Pair(
            side(&sides.chosen)?,
            side(&sides.rejected)?,
            sides.margin,
        ))
    }
}

/// Per-sample bookkeeping while staging (input order).
#[derive(Clone, Copy, Debug)]
pub(crate) struct StagedSample {
    /// Which part's staging files hold the tokens.
    pub part: u32,
    /// Byte offset in that part's [`STAGE_TOKENS`] file.
    pub offset: u64,
    /// Tokens.
    pub len: u32,
    /// Global index of the source file.
    pub file: u32,
    /// Record index in the source file.
    pub record: u64,
    /// [`ROLE_NONE`], [`ROLE_CHOSEN`] or [`ROLE_REJECTED`].
    pub role: u8,
    /// Ids staged as `<u2` ([`STAGE_TOKENS`]).
    pub narrow: bool,
}

/// The encoded samples of a range of input files, staged in `dir`.
pub(crate) struct Part {
    /// Directory holding [`STAGE_TOKENS`].
    pub dir: PathBuf,
    pub samples: Vec<StagedSample>,
    pub tokens: u64,
    pub stats: PackStats,
    pub file_entries: Vec<Value>,
    pub file_table: Vec<Value>,
    /// Trained tokens of each staged sample (its mask's 1s), for a shard's part: a merge
    /// counts a mix's loss tokens per source from them without reading any token.
    pub loss: Vec<u32>,
    /// (part-local sample index, image path, offset of its `<image>` token in the sample,
    /// -1 if none) of LLaVA samples.
    pub images: Vec<(u64, String, i64)>,
    /// (part-local index of the chosen sample, margin) of pairs with a `margin`.
    pub margins: Vec<(u64, f32)>,
    /// The files read (global index, and whether this part is the file's head, see
    /// [`crate::pack::shard`]), one per entry of `file_entries` and `file_table`.
    pub files: Vec<(usize, bool)>,
    /// Skipped examples that name a record by its part-local line and index
    /// ([`crate::pack::numbering`]): the merge names it in the whole file.
    pub sites: Vec<Site>,
}

/// Appends samples of one part to its staging files.
struct Stager {
    tokens: HashedWriter,
    /// Bytes written to `tokens`.
    staged: u64,
    buf: Vec<u8>,
    part: Part,
}

impl Stager {
    /// Stage one sample of `trained` trained tokens (its mask's 1s, counted by the caller).
    fn stage(
        &mut self,
        enc: &Encoded,
        trained: u32,
        file: usize,
        record: u64,
        image: Option<String>,
    ) -> Result<()> {
        // Little-endian `<u2` or `<u4` per id (loops the compiler vectorises; a `flat_map`
        // extend went a byte at a time), then the mask.
        let n = enc.ids.len();
        let narrow = enc.ids.iter().fold(0u32, |m, &x| m | x) < 1 << 16;
        self.buf.clear();
        self.buf.resize(staged_bytes(n as u32, narrow) as usize, 0);
        let (ids, bits) = self.buf.split_at_mut(id_bytes(narrow) * n);
        if narrow {
            for (b, &x) in ids.chunks_exact_mut(2).zip(&enc.ids) {
                b.copy_from_slice(&(x as u16).to_le_bytes());
            }
        } else {
            for (b, x) in ids.chunks_exact_mut(4).zip(&enc.ids) {
                b.copy_from_slice(&x.to_le_bytes());
            }
        }
        if enc.mask.len() != n || !pack_mask_bits(&enc.mask, bits) {
            return Err(Error::Internal(format!(
                "a sample of {n} ids has a loss mask of {} values, not 0/1 each",
                enc.mask.len()
            )));
        }
        self.tokens.write(&self.buf)?;
        if let Some(img) = image {
            let at = enc.ids.iter().position(|&x| x == IMAGE_TOKEN_ID);
            let at = at.map_or(-1, |p| p as i64);
            self.part
                .images
                .push((self.part.samples.len() as u64, img, at));
        }
        self.part.samples.push(StagedSample {
            part: 0,
            offset: self.staged,
            len: enc.ids.len() as u32,
            file: file as u32,
            record,
            role: ROLE_NONE,
            narrow,
        });
        self.part.tokens += enc.ids.len() as u64;
        self.part.loss.push(trained);
        self.staged += self.buf.len() as u64;
        Ok(())
    }

    /// Count and stage one encoded sample (truncation, drops).
    fn take(
        &mut self,
        enc: Encoded,
        raw_len: u64,
        file: usize,
        record: u64,
        image: Option<String>,
    ) -> Result<()> {
        let stats = &mut self.part.stats;
        if enc.truncated > 0 {
            stats.truncated_samples += 1;
            stats.truncated_tokens += enc.truncated;
        }
        let trained = enc.trained() as u64;
        if trained == 0 {
            stats.dropped_samples += 1;
            stats.dropped_tokens += raw_len - enc.truncated;
            return Ok(());
        }
        stats.loss_tokens += trained;
        self.stage(&enc, trained as u32, file, record, image)
    }

    /// Fit a pair into `max_length`, count what was cut or dropped, and stage its two
    /// samples adjacent (chosen, then rejected).
    fn take_pair(
        &mut self,
        chosen: Encoded,
        rejected: Encoded,
        margin: Option<f32>,
        max_length: usize,
        file: usize,
        record: u64,
    ) -> Result<()> {
        let fit = fit_pair(chosen, rejected, max_length);
        let stats = &mut self.part.stats;
        let (PairFit::Keep(c, r) | PairFit::Drop(c, r)) = &fit;
        if c.truncated + r.truncated > 0 {
            stats.truncated_pairs += 1;
        }
        for e in [c, r] {
            if e.truncated > 0 {
                stats.truncated_samples += 1;
                stats.truncated_tokens += e.truncated;
            }
        }
        let PairFit::Keep(c, r) = fit else {
            stats.dropped_pairs += 1;
            stats.dropped_samples += 2;
            stats.dropped_tokens += (c.ids.len() + r.ids.len()) as u64;
            return Ok(());
        };
        stats.pairs += 1;
        let trained = [c.trained() as u32, r.trained() as u32];
        stats.loss_tokens += trained.iter().map(|&t| t as u64).sum::<u64>();
        if let Some(m) = margin {
            self.part.margins.push((self.part.samples.len() as u64, m));
        }
        for ((e, role), t) in [(&c, ROLE_CHOSEN), (&r, ROLE_REJECTED)]
            .into_iter()
            .zip(trained)
        {
            self.stage(e, t, file, record, None)?;
            if let Some(s) = self.part.samples.last_mut() {
                s.role = role;
            }
        }
        Ok(())
    }
}

/// Encode the inputs (all of them, or shard `i` of `n`) into staging files in `dir`.
pub(crate) fn encode_part(
    run: &Run<'_>,
    files: &[InputFile],
    sizes: &[u64],
    shard: Option<(usize, usize)>,
    dir: &Path,
    progress: &dyn Fn(Progress<'_>) -> bool,
) -> Result<Part> {
    let total: u64 = sizes.iter().sum();
    let (i, n) = shard.unwrap_or((0, 1));
    let mut bases = Vec::with_capacity(files.len());
    let mut base = 0u64;
    for &s in sizes {
        bases.push(base);
        base += s;
    }
    let span_of = |fi: usize| match shard {
        Some(_) => Span::new(bases[fi], total, i, n),
        None => Span::ALL,
    };
    // This shard's share of the bytes, for progress.
    let (lo, hi) = (
        (total as u128 * i as u128 / n as u128) as u64,
        (total as u128 * (i as u128 + 1) / n as u128) as u64,
    );
    let mut st = Stager {
        // A shard's part is read by another process (the merge): durable. A single run reads
        // its staged tokens back and deletes them before it commits: scratch.
        tokens: HashedWriter::staged(dir.join(STAGE_TOKENS), shard.is_some())?,
        staged: 0,
        buf: Vec::new(),
        part: Part {
            dir: dir.to_path_buf(),
            samples: Vec::new(),
            tokens: 0,
            stats: PackStats::default(),
            file_entries: Vec::new(),
            file_table: Vec::new(),
            loss: Vec::new(),
            images: Vec::new(),
            margins: Vec::new(),
            files: Vec::new(),
            sites: Vec::new(),
        },
    };
    for (fi, file) in files.iter().enumerate() {
        let span = span_of(fi);
        if !span.reads(sizes[fi], run.cfg.whole_files) {
            continue;
        }
        let whole = run.cfg.whole_files && span.whole_unit(sizes[fi]);
        let from = bases[fi].clamp(lo, hi);
        let report = |done: u64| {
            progress(Progress {
                stage: "encode",
                done: (bases[fi] + done).clamp(from, hi) - lo,
                total: hi - lo,
            })
        };
        if is_pretokenized(&file.path) {
            if span.place(0, sizes[fi]).is_eq() {
                encode_pretok_file(run, file, fi, &mut st, &report)?;
            }
        } else {
            encode_json_file(run, file, fi, span, sizes[fi], whole, &mut st, &report)?;
        }
    }
    st.tokens.finish()?;
    Ok(st.part)
}

/// What the start of a file says, as a single run reads it: its format (`auto`: detected
/// from the first record that parses), or the fault that stops the whole file (no record
/// at all; a first record whose format cannot be detected). Every shard reading part of the
/// file asks, so all of them encode it alike. `next` gives the file's batches from its start;
/// those read are kept in `read` when the caller goes on with the same stream.
fn probe(
    sv: &SourceView,
    file: &InputFile,
    mut next: impl FnMut() -> Result<Vec<OwnedRecord>>,
    mut read: Option<&mut Vec<Vec<OwnedRecord>>>,
) -> Result<std::result::Result<Format, Error>> {
    let mut any = false;
    loop {
        let batch = next()?;
        if batch.is_empty() {
            return Ok(if any {
                // No record parses: they are bad records, the format stays unknown.
                Ok(sv.format)
            } else {
                Err(Error::EmptyFile {
                    path: file.path.clone(),
                })
            });
        }
        any = true;
        let mut found = (sv.format != Format::Auto).then_some(Ok(sv.format));
        for r in &batch {
            if found.is_some() {
                break;
            }
            match sv.detect(&file.path, r) {
                Ok(Some(f)) => found = Some(Ok(f)),
                Ok(None) => {}
                Err(e) => found = Some(Err(e)),
            }
        }
        if let Some(read) = read.as_deref_mut() {
            read.push(batch);
        }
        if let Some(found) = found {
            return Ok(found);
        }
    }
}

/// A fault of the whole file: the head shard records the file (hashed whole) as skipped and
/// reports it; another shard skips it silently (or fails, as every shard of the run does
/// without `skip_bad`).
fn file_fault(
    run: &Run<'_>,
    file: &InputFile,
    fi: usize,
    head: bool,
    st: &mut Stager,
    err: Error,
) -> Result<()> {
    let cfg = run.cfg;
    if !head {
        return if cfg.skip_bad { Ok(()) } else { Err(err) };
    }
    ensure(run.fetch.as_ref(), &file.path, 0, u64::MAX)?;
    let (size, hash) = hash_file(&file.path)?;
    st.part
        .file_entries
        .push(file_entry(&file.name, size, &hash));
    st.part
        .file_table
        .push(json!({"name": file.name, "size": size, "records": 0, "format": Value::Null}));
    st.part.files.push((fi, true));
    st.part.stats.skipped_files += 1;
    skip(cfg, &mut st.part.stats, err)
}

#[allow(clippy::too_many_arguments)]
fn encode_json_file(
    run: &Run<'_>,
    file: &InputFile,
    fi: usize,
    span: Span,
    size: u64,
    whole: bool,
    st: &mut Stager,
    report: &dyn Fn(u64) -> bool,
) -> Result<()> {
    let cfg = run.cfg;
    let sv = run.view(fi);
    let whole_head = span.place(0, size).is_eq();
    let mut stream = match RecordStream::open_with(&file.path, run.fetch.clone(), u64::MAX) {
        Ok(s) => s,
        Err(
            e @ (Error::EmptyFile { .. }
            | Error::Json { .. }
            | Error::Record { .. }
            | Error::Source { .. }),
        ) => {
            return file_fault(run, file, fi, whole_head, st, e);
        }
        Err(e) => return Err(e),
    };
    // A file that is one unit ([`Span::whole_unit`]) is read like one that cannot be split.
    let splittable = stream.splittable() && !whole;
    let head = if splittable {
        span.is_head()
    } else {
        if !whole_head {
            return Ok(());
        }
        // Read whole: asked for at once, not buffer by buffer.
        ensure(run.fetch.as_ref(), &file.path, 0, size)?;
        true
    };
    // A single run probes the stream it reads (a Parquet dictionary page is decoded once);
    // a shard, whose stream may start past the file's first record, opens the file again
    // and reads a few records at a time, in small steps (only as far as the first record
    // that decides: bytes fetched from object storage).
    let mut read_ahead = Vec::new();
    let probed = if span == Span::ALL {
        probe(sv, file, || stream.next_batch(CHUNK), Some(&mut read_ahead))?
    } else {
        let mut from_start = RecordStream::open_with(&file.path, run.fetch.clone(), 0)?;
        from_start.skip_hashing();
        probe(sv, file, || from_start.next_batch(4), None)?
    };
    let fmt = match probed {
        Ok(f) => f,
        Err(e) => return file_fault(run, file, fi, head, st, e),
    };
    // A shard reads part of the file and hashes only the blocks of its share (treehash):
    // every byte of the file is hashed once in the run, and the merge folds the blocks.
    let in_blocks = splittable && span != Span::ALL;
    if in_blocks {
        stream.restrict(span, size)?;
        stream.skip_hashing();
    }
    // Records numbered from a line past the file's start ([`numbering`]).
    let local = (in_blocks && stream.split_by_line()).then(|| stream.first_line());
    let bad = |part: &mut Part, rec: &OwnedRecord, fault| {
        let at = (fi, rec.line, rec.index, local);
        let (stats, sites) = (&mut part.stats, &mut part.sites);
        numbering::bad_record(
            cfg,
            run.fetch.as_ref(),
            &file.path,
            at,
            fault,
            fmt,
            stats,
            sites,
        )
    };
    let mut read_ahead = read_ahead.into_iter();
    let mut records = 0u64;
    loop {
        let mut batch: Vec<OwnedRecord> = match read_ahead.next() {
            Some(b) => b,
            None => stream.next_batch(CHUNK)?,
        };
        if batch.is_empty() {
            break;
        }
        records += batch.len() as u64;
        let results: Vec<_> = run.pool.install(|| {
            batch
                .par_iter_mut()
                .map(|r| match run.encode_openai_text(sv, r, fmt) {
                    Some(out) => Ok(out),
                    None => run.encode_record(sv.record_value(r)?, fmt),
                })
                .collect()
        });
        for (rec, res) in batch.iter().zip(results) {
            match res {
                Ok(Some(RecordOut::Sample(enc, raw_len, image))) => {
                    match crate::pack::image_check::check_sample(cfg, &file.path, &enc.ids, image) {
                        Ok(image) => st.take(enc, raw_len, fi, rec.index, image)?,
                        Err(msg) => bad(&mut st.part, rec, RecordFault::Shape(msg))?,
                    }
                }
                Ok(Some(RecordOut::Pair(c, r, margin))) => {
                    st.take_pair(c, r, margin, cfg.max_length, fi, rec.index)?
                }
                Ok(None) => st.part.stats.dropped_samples += 1,
                Err(fault) => bad(&mut st.part, rec, fault)?,
            }
        }
        if !report(stream.raw_bytes()) {
            return Err(Error::Interrupted);
        }
    }
    let lines = stream.lines_read();
    let (size, hash, share) = if in_blocks {
        let size = stream.size()?;
        let owns = |off| span.place(off, off).is_eq();
        let share = hash_share(&file.path, size, owns, run.fetch.as_ref())?;
        (size, None, Some(share))
    } else {
        let (size, hash) = stream.finish()?;
        (size, Some(hash), None)
    };
    let owns_blocks = match &share {
        Some(Share::Whole(_)) => true,
        Some(Share::Blocks { cvs, .. }) => !cvs.is_empty(),
        None => false,
    };
    if head || records > 0 || owns_blocks || (local.is_some() && lines > 0) {
        let mut row =
            json!({"name": file.name, "size": size, "records": records, "format": fmt.name()});
        let entry = match (&hash, &share) {
            (Some(h), _) | (None, Some(Share::Whole(h))) => file_entry(&file.name, size, h),
            // Folded from every shard's blocks by the merge (shard::join_file_entries).
            _ => json!({"name": file.name, "size": size, "blake3": Value::Null}),
        };
        if in_blocks {
            row[SHARE_PROBE] = json!(treehash::probe(&file.path, size, run.fetch.as_ref())?);
        }
        if local.is_some() {
            row[numbering::LINES] = json!(lines);
        }
        if let Some(Share::Blocks { first, cvs }) = &share {
            if !cvs.is_empty() {
                let cvs: Vec<String> = cvs.iter().map(treehash::to_hex).collect();
                row[BLAKE3_BLOCKS] = json!({"first": first, "cvs": cvs});
            }
        }
        st.part.file_entries.push(entry);
        st.part.file_table.push(row);
        st.part.files.push((fi, head));
    }
    st.part.stats.records += records;
    Ok(())
}

/// What one `.bin` row became.
enum RowOut {
    /// Filtered by `min_length`.
    Short,
    /// ids, mask.
    Tokens(Vec<u32>, Vec<u8>),
    /// Not a `{"tokens": [...]}` line.
    Bad(String),
    /// Token count differs from the `.meta`.
    Mismatch(String),
}

fn encode_pretok_file(
    run: &Run<'_>,
    file: &InputFile,
    fi: usize,
    st: &mut Stager,
    report: &dyn Fn(u64) -> bool,
) -> Result<()> {
    let cfg = run.cfg;
    let mut pf = PretokFile::open(&file.path, cfg.min_length as u64, cfg.rebuild_meta)?;
    let (size, hash) = hash_file(&file.path)?;
    st.part
        .file_entries
        .push(pretok_entry(file, size, &hash, &pf.meta_hash));
    st.part
        .file_table
        .push(json!({"name": file.name, "size": size,
        "records": pf.num_rows(), "format": "pretokenized"}));
    st.part.files.push((fi, true));
    st.part.stats.records += pf.num_rows() as u64;
    let max_length = cfg.max_length;
    loop {
        let batch = pf.next_batch(CHUNK)?;
        if batch.is_empty() {
            break;
        }
        let results: Vec<RowOut> = run.pool.install(|| {
            batch
                .par_iter()
                .map(|row| {
                    let Some(line) = row.line.as_ref() else {
                        return RowOut::Short;
                    };
                    match pretokenized::decode_line(line) {
                        Err(msg) => RowOut::Bad(msg),
                        Ok((ids, mask)) => {
                            match pretokenized::check_count(&file.path, row, ids.len()) {
                                Err(msg) => RowOut::Mismatch(msg),
                                Ok(()) => RowOut::Tokens(ids, mask),
                            }
                        }
                    }
                })
                .collect()
        });
        for (row, res) in batch.iter().zip(results) {
            match res {
                RowOut::Short => {
                    // Shorter than min_length: XTuner's JsonlDataset filters it; we count it.
                    st.part.stats.dropped_samples += 1;
                    st.part.stats.dropped_tokens += row.count;
                }
                RowOut::Tokens(mut ids, mut mask) => {
                    let raw_len = ids.len() as u64;
                    let truncated = raw_len.saturating_sub(max_length as u64);
                    ids.truncate(max_length);
                    mask.truncate(max_length);
                    let enc = Encoded {
                        ids,
                        mask,
                        truncated,
                    };
                    st.take(enc, raw_len, fi, row.row, None)?;
                }
                // A .meta that disagrees with its .bin is corrupt as a whole: never skipped.
                RowOut::Mismatch(msg) => {
                    return Err(Error::Corrupt {
                        path: pretokenized::meta_path(&file.path),
                        msg,
                    })
                }
                RowOut::Bad(msg) => {
                    st.part.stats.skipped_records += 1;
                    let err = Error::Record {
                        path: file.path.clone(),
                        line: row.row + 1,
                        record: row.row,
                        msg: format!("byte offset {}: {msg}", row.offset),
                    };
                    skip(cfg, &mut st.part.stats, err)?;
                }
            }
        }
        if !report(pf.position()) {
            return Err(Error::Interrupted);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits_give_back_every_slice_of_the_mask() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for len in 0..70usize {
            let mask: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as u8 & 1
                })
                .collect();
            let mut bits = vec![0u8; len.div_ceil(8)];
            assert!(pack_mask_bits(&mask, &mut bits));
            assert_eq!(
                staged_bytes(len as u32, false),
                (4 * len + bits.len()) as u64
            );
            assert_eq!(
                staged_bytes(len as u32, true),
                (2 * len + bits.len()) as u64
            );
            for from in 0..=len {
                for to in from..=len {
                    let mut out = vec![7u8; to - from];
                    unpack_mask_bits(&bits, from, &mut out);
                    assert_eq!(out, &mask[from..to], "len {len}, {from}..{to}");
                }
            }
        }
    }

    #[test]
    fn narrow_ids_widen_to_the_packed_files_bytes() {
        let ids: Vec<u32> = (0..21u32)
            .map(|k| k * 3121 % 65536)
            .chain([0xffff])
            .collect();
        let staged: Vec<u8> = ids.iter().flat_map(|&x| (x as u16).to_le_bytes()).collect();
        let mut out = vec![9u8; 4 * ids.len()];
        widen_ids(&staged, true, &mut out);
        let want: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(out, want);
        let mut same = vec![0u8; 4 * ids.len()];
        widen_ids(&want, false, &mut same);
        assert_eq!(same, want);
    }

    #[test]
    fn a_mask_value_other_than_0_or_1_is_refused() {
        let mut bits = [0u8; 2];
        assert!(!pack_mask_bits(&[0, 1, 2, 0, 0, 0, 0, 0, 1], &mut bits));
        assert!(pack_mask_bits(&[0, 1, 1, 0, 0, 0, 0, 0, 1], &mut bits));
        assert_eq!(bits, [0b0000_0110, 0b1]);
    }
}
