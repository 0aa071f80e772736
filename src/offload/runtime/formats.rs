//! What the planner needs to know of a loaded model's weight formats.

use crate::backend::offload::OffloadBackend;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::offload::format::WeightFormat;
use crate::tensor::DType;

/// The formats of `model`'s layer matrices (one for all: the planner sizes every layer
/// alike) and of its LM head, which GGUF files often store in another type.
pub(super) fn stored_formats<B: OffloadBackend>(
    model: &Llama<B>,
) -> Result<(WeightFormat, WeightFormat)> {
    let c = &model.config;
    let format_of = |dtype: DType, what: &str| {
        WeightFormat::of(dtype).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "offloading streams bf16, f16 or quantized weights; {what} is {dtype}: load the \
                 model with --weights bf16 (or q8_0, q4_0)"
            ))
        })
    };
    let format = format_of(model.dtype, "this model's FFN")?;
    let (h, f, q, kv, v) = (
        c.hidden_size,
        c.intermediate_size,
        c.q_dim(),
        c.kv_dim(),
        c.vocab_size,
    );
    let store = model.weights();
    for li in 0..c.num_layers {
        let (a, m) = (
            format!("model.layers.{li}.self_attn"),
            format!("model.layers.{li}.mlp"),
        );
        for (name, shape) in [
            (format!("{a}.q_proj.weight"), [q, h]),
            (format!("{a}.k_proj.weight"), [kv, h]),
            (format!("{a}.v_proj.weight"), [kv, h]),
            (format!("{a}.o_proj.weight"), [h, q]),
            (format!("{m}.gate_proj.weight"), [f, h]),
            (format!("{m}.up_proj.weight"), [f, h]),
            (format!("{m}.down_proj.weight"), [h, f]),
        ] {
            let dtype = store.get(&name, &shape)?.dtype;
            if dtype != model.dtype {
                return Err(Error::InvalidArgument(format!(
                    "offloading needs every layer matrix in one format: {name} is {dtype}, the \
                     FFN is {}; convert at load with --weights q4_0 (or q8_0, bf16)",
                    model.dtype
                )));
            }
        }
    }
    let head = match c.tie_word_embeddings {
        true => "model.embed_tokens.weight",
        false => "lm_head.weight",
    };
    let head_format = format_of(store.get(head, &[v, h])?.dtype, "the LM head")?;
    Ok((format, head_format))
}
