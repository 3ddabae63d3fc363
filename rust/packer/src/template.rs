//! XTuner's prompt templates (`xtuner/utils/templates.py`), with their exact strings, and the
//! semantics of XTuner's `template_map_fn`.

pub(crate) mod chat;
pub(crate) mod encode;

use crate::format::Turn;

/// One prompt template. Field names follow XTuner's `PROMPT_TEMPLATE` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Template {
    /// Template name (`--template`).
    pub name: &'static str,
    /// `SYSTEM`, formatted with `{system}`; None when XTuner's entry has none (minicpm).
    pub system: Option<&'static str>,
    /// `INSTRUCTION`, formatted with `{input}` and `{round}` (1-based).
    pub instruction: &'static str,
    /// `SUFFIX`, appended to every output (trained).
    pub suffix: &'static str,
    /// `SUFFIX_AS_EOS`: the suffix replaces the tokenizer's EOS.
    pub suffix_as_eos: bool,
    /// `SEP`, appended after every turn (not trained).
    pub sep: &'static str,
    /// `STOP_WORDS` for generation.
    pub stop_words: &'static [&'static str],
}

const fn t(
    name: &'static str,
    system: &'static str,
    instruction: &'static str,
    suffix: &'static str,
    suffix_as_eos: bool,
    sep: &'static str,
    stop_words: &'static [&'static str],
) -> Template {
    Template {
        name,
        system: if system.is_empty() {
            None
        } else {
            Some(system)
        },
        instruction,
        suffix,
        suffix_as_eos,
        sep,
        stop_words,
    }
}

const DEEPSEEK_CODER_SYSTEM: &str = "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeekCompany, and you only answer questions related to computer science. For politically sensitive questions, security and privacy issues, and other non-computer science questions, you will refuse to answer. {system}\n";
const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. {system}\n ";
const IM_SYSTEM: &str = "<|im_start|>system\n{system}<|im_end|>\n";
const IM_INSTRUCTION: &str = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n";

/// Every XTuner prompt template of XTuner 0.2.0's `PROMPT_TEMPLATE`, in its order. An empty
/// system string stands for a missing `SYSTEM` entry (minicpm).
pub const TEMPLATES: &[Template] = &[
    t("default", "<|System|>:{system}\n", "<|User|>:{input}\n<|Bot|>:", "", false, "\n", &[]),
    t("zephyr", "<|system|>\n{system}\n", "<|user|>\n{input}\n<|assistant|>\n", "", false, "\n", &[]),
    t("internlm_chat", "<|System|>:{system}\n", "<|User|>:{input}<eoh>\n<|Bot|>:", "<eoa>", true, "\n", &["<eoa>"]),
    t("internlm2_chat", IM_SYSTEM, IM_INSTRUCTION, "<|im_end|>", true, "\n", &["<|im_end|>"]),
    t("moss_sft", "{system}\n", "<|Human|>: {input}<eoh>\n", "", false, "\n", &["<eoc>", "<eom>"]),
    t(
        "llama2_chat",
        "[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n{system}\n<</SYS>>\n [/INST] ",
        "[INST] {input} [/INST]",
        "",
        false,
        "\n",
        &[],
    ),
    t("code_llama_chat", "{system}\n", "[INST] {input} [/INST]", "", false, "", &[]),
    t("chatglm2", "{system}\n", "[Round {round}]\n\n问：{input}\n\n答：", "", false, "\n\n", &[]),
    t("chatglm3", "<|system|>\n{system}", "<|user|>\n{input}<|assistant|>\n", "", false, "\n", &[]),
    t("qwen_chat", IM_SYSTEM, IM_INSTRUCTION, "<|im_end|>", true, "\n", &["<|im_end|>", "<|endoftext|>"]),
    t("baichuan_chat", "{system}\n", "<reserved_102>{input}<reserved_103>", "", false, "\n", &[]),
    t("baichuan2_chat", "{system}\n", "<reserved_106>{input}<reserved_107>", "", false, "\n", &[]),
    t("wizardlm", VICUNA_SYSTEM, "USER: {input} ASSISTANT:", "", false, "\n", &[]),
    t(
        "wizardcoder",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n{system}\n ",
        "### Instruction:\n{input}\n\n### Response:",
        "",
        false,
        "\n\n",
        &[],
    ),
    t("vicuna", VICUNA_SYSTEM, "USER: {input} ASSISTANT:", "", false, "\n", &[]),
    t("deepseek_coder", DEEPSEEK_CODER_SYSTEM, "### Instruction:\n{input}\n### Response:\n", "", false, "\n", &[]),
    t("deepseekcoder", DEEPSEEK_CODER_SYSTEM, "### Instruction:\n{input}\n### Response:\n", "", false, "\n", &[]),
    t("deepseek_moe", "[INST] {system} [/INST]\n", "[INST] {input} [/INST]", "", false, "\n", &[]),
    t(
        "deepseek_v2",
        "{system}\n\n",
        "User: {input}\n\nAssistant: ",
        "<｜end▁of▁sentence｜>",
        true,
        "",
        &["<｜end▁of▁sentence｜>"],
    ),
    t("mistral", "[INST] {system} [/INST]\n", "[INST] {input} [/INST]", "", false, "\n", &[]),
    t("mixtral", "[INST] {system} [/INST]\n", "[INST] {input} [/INST]", "", false, "\n", &[]),
    t("minicpm", "", "<用户> {input} <AI>", "", false, "\n", &[]),
    t("minicpm3", IM_SYSTEM, IM_INSTRUCTION, "<|im_end|>", true, "\n", &["<|im_end|>", "<|endoftext|>"]),
    t(
        "gemma",
        "<start_of_turn>system\n{system}<end_of_turn>\n",
        "<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
        "<end_of_turn>",
        false,
        "\n",
        &["<end_of_turn>"],
    ),
    t(
        "cohere_chat",
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        "<|END_OF_TURN_TOKEN|>",
        true,
        "",
        &["<|END_OF_TURN_TOKEN|>"],
    ),
    t(
        "llama3_chat",
        "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
        true,
        "",
        &["<|eot_id|>"],
    ),
    t("phi3_chat", "<|system|>\n{system}<|end|>\n", "<|user|>\n{input}<|end|>\n<|assistant|>\n", "<|end|>", true, "\n", &["<|end|>"]),
];

/// Look a template up by name. `"none"` is not a template: it means "use the turns as they
/// are" (XTuner's `template_map_fn=None`, e.g. for pretraining text).
pub fn by_name(name: &str) -> Option<&'static Template> {
    TEMPLATES.iter().find(|t| t.name == name)
}

/// Python's `str.format` for the fields a template uses, in one pass (so a `{round}` inside
/// user text is left alone), with `{{`/`}}` escapes.
pub fn py_format(fmt: &str, fields: &[(&str, &str)]) -> String {
    let mut out =
        String::with_capacity(fmt.len() + fields.iter().map(|f| f.1.len()).sum::<usize>());
    py_format_into(&mut out, fmt, fields);
    out
}

/// [`py_format`] appended to `out`.
pub fn py_format_into(out: &mut String, fmt: &str, fields: &[(&str, &str)]) {
    let mut rest = fmt;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if let Some(end) = tail.find('}').filter(|_| tail.starts_with('{')) {
            let key = &tail[1..end];
            if let Some((_, v)) = fields.iter().find(|(k, _)| *k == key) {
                out.push_str(v);
                rest = &tail[end + 1..];
                continue;
            }
        }
        out.push_str(&tail[..1]);
        rest = &tail[1..];
    }
    out.push_str(rest);
}

impl Template {
    /// XTuner's `template_map_fn`, in place: INSTRUCTION around every input (with the 1-based
    /// round), SYSTEM before it when the turn has a system text, SUFFIX after every output,
    /// `need_eos_token = !SUFFIX_AS_EOS`, `sep = SEP`. A system text under a template
    /// without `SYSTEM` is an error, as `template.SYSTEM` fails in XTuner.
    pub fn apply(&self, turns: &mut [Turn]) -> Result<(), String> {
        for (i, turn) in turns.iter_mut().enumerate() {
            let mut input = String::new();
            self.render_input(i, &turn.system, &turn.input, &mut input)?;
            turn.input = input;
            if !self.suffix.is_empty() {
                turn.output.push_str(self.suffix);
            }
            turn.need_eos_token = !self.suffix_as_eos;
            turn.sep = self.sep.to_string();
        }
        Ok(())
    }

    /// The input text of turn `i` (0-based) as [`Template::apply`] makes it, appended to
    /// `out`: SYSTEM with `system` (when not empty), then INSTRUCTION with `input` and the
    /// round.
    pub fn render_input(
        &self,
        i: usize,
        system: &str,
        input: &str,
        out: &mut String,
    ) -> Result<(), String> {
        if !system.is_empty() {
            let Some(tpl) = self.system else {
                return Err(format!(
                    "turn {i} has a system text but template {:?} has no SYSTEM (XTuner's \
                     template_map_fn fails on it too): choose another template",
                    self.name
                ));
            };
            py_format_into(out, tpl, &[("system", system)]);
        }
        let mut digits = [0u8; 20];
        let round = decimal(i + 1, &mut digits);
        py_format_into(out, self.instruction, &[("input", input), ("round", round)]);
        Ok(())
    }
}

/// `n` in decimal, written into `buf` (`n.to_string()` without the allocation).
fn decimal(mut n: usize, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_single_pass() {
        assert_eq!(
            py_format(
                "[{round}] {input}!",
                &[("input", "x {round} {{y}}"), ("round", "2")]
            ),
            "[2] x {round} {{y}}!"
        );
        assert_eq!(py_format("a{{b}}c{zz}", &[]), "a{b}c{zz}");
    }

    #[test]
    fn qwen_chat_map() {
        let mut turns = vec![
            Turn {
                system: "S".into(),
                input: "hi".into(),
                output: "yo".into(),
                output_with_loss: true,
                need_eos_token: true,
                sep: String::new(),
            },
            Turn {
                input: "again".into(),
                output: "ok".into(),
                ..Default::default()
            },
        ];
        by_name("qwen_chat").unwrap().apply(&mut turns).unwrap();
        assert_eq!(
            turns[0].input,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(turns[0].output, "yo<|im_end|>");
        assert!(!turns[0].need_eos_token);
        assert_eq!(turns[1].sep, "\n");
        let names: std::collections::HashSet<_> = TEMPLATES.iter().map(|t| t.name).collect();
        assert_eq!(names.len(), TEMPLATES.len());
        assert!(by_name("chatglm2").unwrap().instruction.contains("{round}"));
        // minicpm has no SYSTEM in XTuner: fine without a system text, an error with one
        let mm = by_name("minicpm").unwrap();
        let mut plain = vec![Turn {
            input: "q".into(),
            ..Default::default()
        }];
        mm.apply(&mut plain).unwrap();
        assert_eq!(plain[0].input, "<用户> q <AI>");
        let e = mm.apply(&mut turns[..1].to_vec()).unwrap_err();
        assert!(e.contains("minicpm") && e.contains("SYSTEM"), "{e}");
    }
}
