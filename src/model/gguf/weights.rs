//! A GGUF's tensors as a [`WeightStore`] with Hugging Face names, shapes and row order.
//!
//! Matrices stay as stored (quantized blocks included) and are read in place from the file's
//! mapping; only what must change is written into a second, anonymous mapping: Q/K matrices of
//! `llama` files, whose rows llama.cpp interleaved per head for ggml's rotary layout (rows move
//! whole, blocks and all), and vectors (norms, biases) widened to f32. With
//! [`GgufWeights::Float`] every matrix is de-quantized into that mapping instead (in parallel,
//! with a progress bar), which is what sparsity and offloading need today. Dimensions are
//! listed innermost first in GGUF: a `[cols, rows]` tensor is an `[rows, cols]` matrix.

use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};

use super::hf::GgufArch;
use super::{GgufFile, GgufTensor};
use crate::error::{Error, Result};
use crate::model::weights::{MappedTensor, WeightStore};
use crate::progress::progress_bar;
use crate::tensor::quant::dequantize;
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

/// How matrices are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufWeights {
    /// As stored in the file.
    Native,
    /// De-quantized (or converted) to this float type.
    Float(DType),
}

/// One tensor to write: where it comes from and how it lands.
struct Job<'f> {
    src: &'f GgufTensor,
    bytes: &'f [u8],
    dtype: DType,
    rows: usize,
    cols: usize,
    /// Heads whose Q/K rows are interleaved (llama files), or 0.
    unpermute_heads: usize,
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
    let fail = |msg: String| Error::Gguf {
        path: path.to_path_buf(),
        msg,
    };
    let mut jobs = Vec::new();
    let mut entries = Vec::new();
    let mut offset = 0usize;
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
        if dtype == t.kind && unpermute_heads == 0 {
            // Read in place from the file.
            entries.push(MappedTensor {
                name,
                dtype,
                shape,
                mapping: 0,
                range,
            });
            continue;
        }
        let len = dtype.bytes_for(rows * cols);
        entries.push(MappedTensor {
            name,
            dtype,
            shape,
            mapping: 1,
            range: offset..offset + len,
        });
        offset += len.next_multiple_of(64);
        jobs.push(Job {
            src: t,
            bytes: &map[range],
            dtype,
            rows,
            cols,
            unpermute_heads,
        });
    }
    let converted = convert_all(&jobs, offset)?;
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
        (_, GgufWeights::Float(float)) => float,
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

/// Writes every job into one fresh read-only mapping of `total` bytes, on all cores.
fn convert_all(jobs: &[Job<'_>], total: usize) -> Result<memmap2::Mmap> {
    let io = |e: std::io::Error| Error::io("anonymous memory for the GGUF weights", e);
    let mut map = memmap2::MmapOptions::new()
        .len(total.max(1))
        .map_anon()
        .map_err(io)?;
    let elements: u64 = jobs.iter().map(|j| (j.rows * j.cols) as u64).sum();
    let bar = progress_bar(elements, "gguf");
    let mut slices = Vec::with_capacity(jobs.len());
    let mut rest: &mut [u8] = &mut map[..];
    for job in jobs {
        let len = job.dtype.bytes_for(job.rows * job.cols);
        let (mine, tail) = rest.split_at_mut(len);
        slices.push((job, mine));
        rest = tail
            .get_mut(len.next_multiple_of(64) - len..)
            .unwrap_or_default();
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Largest first, dealt round-robin: the embedding table does not end up last on one core.
    slices.sort_by_key(|(job, _)| std::cmp::Reverse(job.rows * job.cols));
    let mut lanes: Vec<Vec<(&Job<'_>, &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, slice) in slices.into_iter().enumerate() {
        lanes[i % threads].push(slice);
    }
    let failed = std::thread::scope(|s| {
        let handles: Vec<_> = lanes
            .into_iter()
            .map(|lane| {
                let bar = &bar;
                s.spawn(move || {
                    lane.into_iter()
                        .map(|(job, out)| {
                            let ok = convert(job, out);
                            bar.inc((job.rows * job.cols) as u64);
                            (!ok).then(|| job.src.name.clone())
                        })
                        .find_map(|bad| bad)
                })
            })
            .collect();
        handles.into_iter().find_map(|h| {
            h.join()
                .unwrap_or_else(|_| Some("(a worker panicked)".into()))
        })
    });
    bar.finish_and_clear();
    if let Some(name) = failed {
        return Err(Error::InvalidArgument(format!(
            "tensor `{name}`: its bytes are not whole blocks of its type"
        )));
    }
    map.make_read_only().map_err(io)
}

/// Converts one tensor row by row into `out` (HF row order); `false` if a row's bytes are
/// not whole blocks.
fn convert(job: &Job<'_>, out: &mut [u8]) -> bool {
    let src_row_bytes = job.bytes.len() / job.rows.max(1);
    let out_row_bytes = job.dtype.bytes_for(job.cols);
    let mut row = vec![0f32; job.cols];
    for (r, dst) in out.chunks_exact_mut(out_row_bytes).enumerate() {
        let from = source_row(r, job.rows, job.unpermute_heads);
        let src = &job.bytes[from * src_row_bytes..(from + 1) * src_row_bytes];
        if job.dtype == job.src.kind {
            // A row moves whole, blocks and all.
            dst.copy_from_slice(src);
        } else if !dequantize(job.src.kind, src, &mut row) {
            return false;
        } else {
            encode(&row, job.dtype, dst);
        }
    }
    true
}

/// The GGUF row holding HF row `r`: within a head of `2 * half` rows, llama.cpp stored HF
/// row `j * half + i` at row `2 * i + j`.
fn source_row(r: usize, rows: usize, heads: usize) -> usize {
    if heads == 0 {
        return r;
    }
    let half = rows / heads / 2;
    let (head, within) = (r / (2 * half), r % (2 * half));
    let (j, i) = (within / half, within % half);
    head * 2 * half + 2 * i + j
}

fn encode(row: &[f32], dtype: DType, out: &mut [u8]) {
    match dtype {
        DType::F32 => row
            .iter()
            .zip(out.chunks_exact_mut(4))
            .for_each(|(v, o)| o.copy_from_slice(&v.to_le_bytes())),
        DType::F16 => row
            .iter()
            .zip(out.chunks_exact_mut(2))
            .for_each(|(v, o)| o.copy_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => row
            .iter()
            .zip(out.chunks_exact_mut(2))
            .for_each(|(v, o)| o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        // Only float targets are encoded: a quantized matrix is either copied as it is or
        // de-quantized to a float type.
        _ => out.fill(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_rows_undo_the_interleave_per_head() {
        // 2 heads of 4 rows: GGUF order per head [a0, b0, a1, b1] with a = HF 0..2, b = 2..4.
        let order: Vec<usize> = (0..8).map(|r| source_row(r, 8, 2)).collect();
        assert_eq!(order, [0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(source_row(5, 8, 0), 5);
    }

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
