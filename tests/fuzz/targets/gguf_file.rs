//! GGUF files mutated field by field (metadata values and types, tensor dimensions, types,
//! names and data) and byte by byte (every count, length, dimension, type and offset set to
//! edge values; cuts, insertions, splices), opened by `ModelFiles` as `--model x.gguf` is
//! (config, tokenizer, chat template, stop ids, weights as stored or de-quantized), read by
//! `plan`'s `stored_types`, and (one case in eight) loaded as a model.

use std::path::Path;

use sirius_offload::backend::CpuBackend;
use sirius_offload::model::chat::ChatMessage;
use sirius_offload::model::{Llama, ModelFiles, WeightsChoice};
use sirius_offload::tensor::DType;

use crate::fuzz::{gguf, one_line, Case, Rng, Target, Verdict};

const FILE: &str = "model.gguf";

pub struct GgufTarget {
    /// Another valid GGUF (the checked-in fixture) to splice from.
    other: Vec<u8>,
}

impl GgufTarget {
    pub fn new() -> GgufTarget {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-mixed.gguf");
        GgufTarget {
            other: std::fs::read(fixture).unwrap_or_default(),
        }
    }
}

/// An opened model's parts agree: every tensor's bytes fit its shape, the tokenizer's ids fit
/// the model, the template renders or refuses in one line.
fn consistent(files: &ModelFiles) -> Result<(), String> {
    let culprit = FILE;
    for (name, shape) in files.weights.shapes() {
        match files.weights.get(name, shape) {
            Ok(t) => {
                let elements: usize = shape.iter().product();
                if t.bytes().len() != t.dtype.bytes_for(elements) {
                    return Err(format!(
                        "`{name}` {shape:?} {} has {} bytes",
                        t.dtype,
                        t.bytes().len()
                    ));
                }
            }
            Err(e) => {
                one_line(&e.to_string(), culprit)?;
            }
        }
    }
    let text = &files.text;
    if text.tokenizer.vocab_size() > files.config.vocab_size {
        return Err("the tokenizer has more tokens than the model's vocab_size".into());
    }
    if let Ok(ids) = text.tokenizer.encode("ab a <|im_end|>", false) {
        let _ = text.tokenizer.decode(&ids, true);
    }
    if let Some(t) = &text.chat_template {
        let m = ChatMessage {
            role: "user".into(),
            content: "ab".into(),
        };
        if let Err(e) = t.render(&[m]) {
            one_line(&e.to_string(), "chat template")?;
        }
    }
    Ok(())
}

impl Target for GgufTarget {
    const NAME: &'static str = "gguf";

    fn make(&self, rng: &mut Rng) -> Case {
        let mut case = Case::one(FILE, gguf::mutate(rng, &self.other));
        case.deep = rng.one_in(8);
        case
    }

    fn check(&self, case: &Case, dir: &Path) -> Result<Verdict, String> {
        let path = dir.join(FILE);
        if let Err(e) = ModelFiles::stored_types(&path) {
            one_line(&e.to_string(), FILE)?;
        }
        let mut choices = vec![WeightsChoice::AsStored];
        if case.deep {
            choices.push(WeightsChoice::Convert(DType::BF16));
        }
        let mut verdict = Verdict::Refused;
        for choice in choices {
            match ModelFiles::open_with(&path, choice) {
                Ok(files) => {
                    consistent(&files)?;
                    verdict = Verdict::Accepted;
                    if case.deep {
                        if let Err(e) =
                            Llama::from_store(files.config, files.weights, CpuBackend::new(1))
                        {
                            one_line(&e.to_string(), FILE)?;
                        }
                    }
                }
                Err(e) => {
                    one_line(&e.to_string(), FILE)?;
                }
            }
        }
        Ok(verdict)
    }
}
