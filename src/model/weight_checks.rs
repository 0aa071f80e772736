//! Checks of a checkpoint against its config that shapes alone cannot make: every tensor is
//! one the model reads (a config.json with fewer layers, or no biases, would otherwise run
//! another model without a word), and no weight is NaN or infinite.

use std::collections::HashSet;
use std::path::Path;

use crate::config::{is_gguf, ModelConfig};
use crate::error::{Error, Result};
use crate::model::weights::WeightStore;
use crate::progress::progress_bar;
use crate::tensor::TensorRef;

/// Tensors a checkpoint may carry that no config asks for: a tied model's separate head
/// (some exporters write it anyway) and the RoPE module's buffers older exporters saved
/// (`rotary_emb.inv_freq`, `model.rotary_emb.step`).
fn harmless(name: &str, config: &ModelConfig) -> bool {
    (name == "lm_head.weight" && config.tie_word_embeddings) || name.contains("rotary_emb.")
}

/// `Err` naming the first tensor of `store` that loading did not read (`used`), and why the
/// config leaves it out.
pub(crate) fn check_all_used(
    store: &WeightStore,
    used: &HashSet<String>,
    config: &ModelConfig,
) -> Result<()> {
    let unused: Vec<&str> = (store.shapes().into_iter())
        .map(|(name, _)| name)
        .filter(|name| !used.contains(*name) && !harmless(name, config))
        .collect();
    let Some(first) = unused.first() else {
        return Ok(());
    };
    let path = store.path_of(first).unwrap_or(Path::new("")).to_path_buf();
    let gguf = is_gguf(&path);
    let layers_key = match gguf {
        true => "block_count",
        false => "num_hidden_layers",
    };
    let max_layer = (unused.iter())
        .filter_map(|name| layer_of(name))
        .filter(|&l| l >= config.num_layers)
        .max();
    let (name, why) = match max_layer {
        Some(last) => (
            first.to_string(),
            format!(
                "the checkpoint holds {} layers but the config's {layers_key} is {}: give the \
                 config that came with these weights",
                last + 1,
                config.num_layers
            ),
        ),
        None => {
            let what = match first.ends_with(".bias") {
                true => "a bias the config does not enable (attention_bias, mlp_bias)",
                false => "no tensor of that name belongs to this architecture",
            };
            let fix = match gguf {
                true => "the file's metadata and tensors disagree",
                false => "fix config.json or remove the tensor",
            };
            (first.to_string(), format!("{what}: {fix}"))
        }
    };
    // A GGUF's tensors have their own names: the user looks for those.
    let name = match gguf {
        true => crate::model::gguf::weights::gguf_name(&name).unwrap_or(name),
        false => name,
    };
    Err(Error::UnusedTensor { path, name, why })
}

/// The layer index of `model.layers.N....`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// `Err` naming `t` when one of its values is NaN or infinite (small tensors, at load).
pub(crate) fn check_finite(t: &TensorRef, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(non_finite(t, index, values[index])),
        None => Ok(()),
    }
}

fn non_finite(t: &TensorRef, index: usize, value: f32) -> Error {
    Error::NonFiniteWeight {
        path: t.path.clone(),
        name: t.name.clone(),
        index,
        value,
    }
}

/// Reads every value of every tensor of `store` (`--check-weights`): `Err` naming the first
/// tensor with a NaN or infinity. Minutes for a large model: a progress bar counts the bytes.
pub fn scan_finite(store: &WeightStore, show_progress: bool) -> Result<()> {
    let tensors = store.all()?;
    let total: u64 = tensors.iter().map(|t| t.bytes().len() as u64).sum();
    let bar = show_progress.then(|| progress_bar(total, "checking weights"));
    for t in &tensors {
        let found = t.first_non_finite(|bytes| {
            if let Some(bar) = &bar {
                bar.inc(bytes);
            }
        });
        if let Some((index, value)) = found {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            return Err(non_finite(t, index, value));
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    tracing::info!(
        tensors = tensors.len(),
        bytes = total,
        "every weight is finite"
    );
    Ok(())
}
