//! tokenizer.json (word-level, and byte-level BPE as a GGUF's vocabulary rebuilds it),
//! tokenizer_config.json (the chat template as a string or a named list, special tokens as
//! strings or objects) and generation_config.json, one of them mutated per case; loaded the
//! way a model directory is, then used: text encoded, decoded and streamed, a conversation
//! rendered, the stop ids read.

use std::path::Path;

use serde_json::{json, Value};
use sirius_offload::config::generation::stop_token_ids;
use sirius_offload::model::chat::{ChatMessage, ChatTemplate};
use sirius_offload::model::gguf::{hf, GgufFile};
use sirius_offload::model::{TextStream, Tokenizer};

use crate::common::tokenizer_json;
use crate::fuzz::{gguf, json as fjson, one_line, Case, Rng, Target, Verdict};

const TOKENIZER_KEYS: &[&str] = &[
    "version",
    "added_tokens",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "model",
    "type",
    "vocab",
    "merges",
    "unk_token",
    "id",
    "content",
    "special",
    "single_word",
    "lstrip",
    "rstrip",
    "normalized",
    "add_prefix_space",
    "trim_offsets",
    "use_regex",
    "byte_fallback",
    "fuse_unk",
    "dropout",
    "continuing_subword_prefix",
    "end_of_word_suffix",
    "ignore_merges",
    "prefix",
    "cleanup",
    "pretokenizers",
    "single",
    "pair",
    "special_tokens",
    "ids",
    "tokens",
    "pattern",
    "behavior",
    "invert",
];
const CONFIG_KEYS: &[&str] = &[
    "chat_template",
    "bos_token",
    "eos_token",
    "name",
    "template",
    "content",
    "eos_token_id",
    "bos_token_id",
    "pad_token_id",
];

const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}\
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const LLAMA3: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'].strip() %}\
{% else %}{% set system = 'Today Date: ' + strftime_now('%d %b %Y') %}{% endif %}\
{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}\
{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + eos_token }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

pub struct Text {
    tokenizers: Vec<Value>,
    configs: Vec<Value>,
    generation: Value,
}

impl Text {
    pub fn new() -> Text {
        let (bytes, _) = gguf::seed().write();
        let bpe = GgufFile::parse(Path::new("seed.gguf"), &bytes)
            .ok()
            .and_then(|f| hf::tokenizer_json(&f).ok());
        let mut tokenizers = vec![tokenizer_json(48)];
        tokenizers.extend(bpe);
        let configs = vec![
            json!({"chat_template": CHATML, "bos_token": "<s>", "eos_token": "</s>"}),
            json!({"chat_template": LLAMA3, "bos_token": {"content": "<s>", "lstrip": false},
                   "eos_token": {"content": "</s>"}}),
            json!({"chat_template": [{"name": "default", "template": CHATML},
                                     {"name": "tool_use", "template": LLAMA3}]}),
        ];
        let generation = json!({"bos_token_id": 1, "eos_token_id": [2, 5], "do_sample": true});
        Text {
            tokenizers,
            configs,
            generation,
        }
    }
}

fn conversation() -> Vec<ChatMessage> {
    [
        ("system", "Be brief."),
        ("user", "w3 w4 ab a"),
        ("assistant", "Ġa"),
        ("user", "é <|im_end|>"),
    ]
    .map(|(role, content)| ChatMessage {
        role: role.into(),
        content: content.into(),
    })
    .to_vec()
}

/// The tokenizer used as a prompt and a stream would use it.
fn use_tokenizer(t: &Tokenizer) -> Result<(), String> {
    let culprit = "tokenizer.json";
    for add_special in [false, true] {
        let ids = match t.encode("w3 w4 ab a é <|im_end|>  \n", add_special) {
            Ok(ids) => ids,
            Err(e) => return one_line(&e.to_string(), culprit).map(|_| ()),
        };
        if let Err(e) = t.decode(&ids, add_special) {
            one_line(&e.to_string(), culprit)?;
        }
        let mut stream = TextStream::new(t);
        for &id in ids.iter().chain(&[0, 1, u32::MAX]) {
            if let Err(e) = stream.push(id) {
                one_line(&e.to_string(), culprit)?;
            }
        }
        if let Err(e) = stream.finish() {
            one_line(&e.to_string(), culprit)?;
        }
    }
    let _ = t.vocab_size();
    Ok(())
}

impl Target for Text {
    const NAME: &'static str = "tokenizer_and_chat";

    fn make(&self, rng: &mut Rng) -> Case {
        let which = rng.below(5);
        let mut tokenizer = serde_json::to_vec(rng.pick(&self.tokenizers)).unwrap_or_default();
        let mut config = serde_json::to_vec(rng.pick(&self.configs)).unwrap_or_default();
        let mut generation = serde_json::to_vec(&self.generation).unwrap_or_default();
        match which {
            0 | 1 => {
                let seed = rng.pick(&self.tokenizers).clone();
                tokenizer = fjson::mutate(rng, &seed, TOKENIZER_KEYS);
            }
            2 | 3 => {
                let seed = rng.pick(&self.configs).clone();
                config = fjson::mutate(rng, &seed, CONFIG_KEYS);
            }
            _ => generation = fjson::mutate(rng, &self.generation, CONFIG_KEYS),
        }
        let mut case = Case::one("tokenizer.json", tokenizer);
        case.files.push(("tokenizer_config.json".into(), config));
        case.files
            .push(("generation_config.json".into(), generation));
        case
    }

    fn check(&self, _case: &Case, dir: &Path) -> Result<Verdict, String> {
        let mut accepted = true;
        match Tokenizer::from_file(&dir.join("tokenizer.json")) {
            Ok(t) => use_tokenizer(&t)?,
            Err(e) => {
                one_line(&e.to_string(), "tokenizer.json")?;
                accepted = false;
            }
        }
        match ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json")) {
            Ok(Some(t)) => {
                if let Err(e) = t.render(&conversation()) {
                    one_line(&e.to_string(), "chat template")?;
                }
            }
            Ok(None) => {}
            Err(e) => {
                one_line(&e.to_string(), "tokenizer_config.json")?;
                accepted = false;
            }
        }
        match stop_token_ids(dir, &[2]) {
            Ok(ids) if !ids.contains(&2) || !ids.windows(2).all(|w| w[0] < w[1]) => {
                return Err(format!(
                    "stop ids {ids:?} lost config.json's 2 or are not sorted"
                ))
            }
            Ok(_) => {}
            Err(e) => {
                one_line(&e.to_string(), "generation_config.json")?;
                accepted = false;
            }
        }
        Ok(if accepted {
            Verdict::Accepted
        } else {
            Verdict::Refused
        })
    }
}
