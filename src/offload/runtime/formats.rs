//! What the planner needs to know of a loaded model's weight formats.

use crate::backend::offload::OffloadBackend;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::offload::format::WeightFormat;
use crate::offload::host_store::layer_matrices;
use crate::offload::placement::LayerFormats;

/// The formats of `model`'s layer matrices: the one that names the model (the FFN's gate)
/// and, where layers mix block formats (a GGUF Q4_K_M's Q6_K v and down matrices), each
/// layer's; and the format of its LM head, which GGUF files often store in another type.
pub(super) fn stored_formats<B: OffloadBackend>(
    model: &Llama<B>,
) -> Result<(WeightFormat, Option<Vec<LayerFormats>>, WeightFormat)> {
    let c = &model.config;
    let (h, v) = (c.hidden_size, c.vocab_size);
    let store = model.weights();
    let mut layers = Vec::with_capacity(c.num_layers);
    for li in 0..c.num_layers {
        let mut dtypes = [model.dtype; 7];
        for (slot, (name, shape)) in dtypes.iter_mut().zip(layer_matrices(c, li)) {
            *slot = store.get(&name, &shape)?.dtype;
        }
        layers.push(dtypes);
    }
    let unplannable = |what: String, dtype| {
        Error::InvalidArgument(format!(
            "offloading streams bf16, f16 or quantized weights; {what} is {dtype}: load the \
             model with --weights bf16 (or q8_0, q4_0)"
        ))
    };
    let (format, layer_formats) = LayerFormats::of_stored(&layers).map_err(|(li, j, dtype)| {
        unplannable(format!("layer {li}'s {}", LayerFormats::MATRICES[j]), dtype)
    })?;
    if let Some(mixed) = &layer_formats {
        let float = mixed
            .iter()
            .flat_map(|l| l.attention.iter().chain(&l.ffn))
            .any(|f| !f.is_quantized());
        if float {
            return Err(Error::InvalidArgument(format!(
                "offloading needs the layer matrices in one float format or in block formats \
                 only; this model mixes {format} with others: convert at load with --weights \
                 bf16 (or q8_0, q4_0)"
            )));
        }
    }
    let head = match c.tie_word_embeddings {
        true => "model.embed_tokens.weight",
        false => "lm_head.weight",
    };
    let head_dtype = store.get(head, &[v, h])?.dtype;
    let head_format = WeightFormat::of(head_dtype)
        .ok_or_else(|| unplannable("the LM head".into(), head_dtype))?;
    Ok((format, layer_formats, head_format))
}
