//! A GGUF's tensors as a [`WeightStore`] with Hugging Face names, shapes and row order.
//!
//! Matrices stay as stored (quantized blocks included) and are read in place from the file's
//! mapping; only what must change is written into a second, anonymous mapping: Q/K matrices of
//! `llama` files, whose rows llama.cpp interleaved per head for ggml's rotary layout (rows move
//! whole, blocks and all), and vectors (norms, biases) widened to f32. With
//! [`GgufWeights::Convert`] every matrix is converted into that mapping instead
//! (`crate::model::convert`: de-quantized to a float type, or re-quantized). Dimensions are
//! listed innermost first in GGUF: a `[cols, rows]` tensor is an `[rows, cols]` matrix.

use std::path::Path;
use std::sync::Arc;

use super::hf::GgufArch;
use super::{GgufFile, GgufTensor};
use crate::error::{Error, Result};
use crate::model::convert::{convert_all, ConvertJob};
use crate::model::weights::{MappedTensor, WeightStore};
use crate::tensor::DType;

/// GGUF tensor names (per layer after `blk.N.`) and their Hugging Face names.
const LAYER_NAMES: [(&str, &str); 12] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

fn hf_name(name: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == name) {
        return Some(hf.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The GGUF name of Hugging Face tensor `hf` (`model.norm.weight` -> `output_norm.weight`),
/// for errors about a GGUF file.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

/// How matrices are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufWeights {
    /// As stored in the file.
    Native,
    /// Converted to this type (de-quantized to a float type, or re-quantized); a matrix
    /// whose rows cannot hold its blocks stays as stored.
    Convert(DType),
}

/// The store: every tensor of `file` (mapped as `map`) under its HF name, matrices as `mode`
/// says, vectors in f32.
pub fn weight_store(
    path: &Path,
    file: &GgufFile,
    map: &Arc<memmap2::Mmap>,
    arch: GgufArch,
    heads: (usize, usize),
    mode: GgufWeights,
) -> Result<WeightStore> {
    let fail = |msg: String| Error::gguf(path, msg);
    let mut jobs = Vec::new();
    let mut entries = Vec::new();
    for t in &file.tensors {
        let name = hf_name(&t.name).ok_or_else(|| {
            fail(format!(
                "tensor `{}` is not one a Llama/Qwen2 model uses",
                t.name
            ))
        })?;
        let Planned {
            range,
            shape,
            rows,
            cols,
            dtype,
            unpermute_heads,
        } = plan(t, map.len(), arch, heads, mode)
            .map_err(|msg| fail(format!("tensor `{}`: {msg}", t.name)))?;
        let converted = !(dtype == t.kind && unpermute_heads == 0);
        entries.push((name, dtype, shape, range.clone(), converted));
        if converted {
            jobs.push(ConvertJob {
                name: &t.name,
                bytes: &map[range],
                from: t.kind,
                to: dtype,
                rows,
                cols,
                unpermute_heads,
            });
        }
    }
    let (converted, out_ranges) = convert_all(&jobs, "gguf")?;
    let mut out_ranges = out_ranges.into_iter();
    let entries = entries
        .into_iter()
        .map(|(name, dtype, shape, range, converted)| MappedTensor {
            name,
            dtype,
            shape,
            // Read in place from the file, or from the converted mapping.
            mapping: usize::from(converted),
            range: match converted {
                true => out_ranges.next().unwrap_or_default(),
                false => range,
            },
        })
        .collect();
    WeightStore::from_mappings(
        path.to_path_buf(),
        vec![Arc::clone(map), Arc::new(converted)],
        entries,
    )
}

/// Where one tensor comes from and what it becomes.
struct Planned {
    range: std::ops::Range<usize>,
    shape: Vec<usize>,
    rows: usize,
    cols: usize,
    dtype: DType,
    unpermute_heads: usize,
}

/// Checks tensor `t` of a `file_len`-byte file and decides its type and row order.
fn plan(
    t: &GgufTensor,
    file_len: usize,
    arch: GgufArch,
    heads: (usize, usize),
    mode: GgufWeights,
) -> std::result::Result<Planned, String> {
    let range = usize::try_from(t.start)
        .ok()
        .zip(usize::try_from(t.len).ok())
        .map(|(start, len)| start..start + len)
        .filter(|r| r.end <= file_len)
        .ok_or("it lies outside the file")?;
    let (rows, cols, shape) = match t.dims[..] {
        [n] => (1, n as usize, vec![n as usize]),
        [c, r] => (r as usize, c as usize, vec![r as usize, c as usize]),
        _ => return Err(format!("it has dimensions {:?}", t.dims)),
    };
    // An empty tensor would pass every size check with any other dimension (found by the
    // fuzz loop: 0 x 2^48); no model tensor is empty.
    if rows == 0 || cols == 0 {
        return Err(format!("it is empty (dimensions {:?})", t.dims));
    }
    let dtype = match (shape.len(), mode) {
        (1, _) => DType::F32,
        (_, GgufWeights::Convert(to)) if to.fits_row(cols) => to,
        (_, GgufWeights::Convert(_)) => t.kind,
        (_, GgufWeights::Native) => t.kind,
    };
    let unpermute_heads = match (arch, t.name.rsplit('.').nth(1)) {
        (GgufArch::Llama, Some("attn_q")) if shape.len() == 2 => heads.0,
        (GgufArch::Llama, Some("attn_k")) if shape.len() == 2 => heads.1,
        _ => 0,
    };
    if unpermute_heads > 0 && !rows.is_multiple_of(2 * unpermute_heads) {
        return Err(format!(
            "{rows} rows do not split into {unpermute_heads} heads of even size"
        ));
    }
    Ok(Planned {
        range,
        shape,
        rows,
        cols,
        dtype,
        unpermute_heads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name("blk.12.ffn_down.weight").as_deref(),
            Some("model.layers.12.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").as_deref(),
            Some("model.layers.0.self_attn.k_proj.bias")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_qkv.weight"), None);
    }
}
