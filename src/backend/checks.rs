//! Argument checks every backend makes: the CPU and CUDA backends refuse the same inputs with
//! the same words.

use super::{BundleLayout, BundleSelection};
use crate::error::{Error, Result};
use crate::tensor::DType;
use crate::tensor::TensorRef;

/// `(rows, cols)` of a checkpoint tensor that must be a 2-D matrix.
pub(crate) fn matrix_shape(t: &TensorRef) -> Result<(usize, usize)> {
    match t.shape.as_slice() {
        [_, c] if !t.dtype.fits_row(*c) => Err(Error::Safetensors {
            path: t.path.clone(),
            msg: format!(
                "tensor `{}`: rows of {c} values are not whole {} blocks of {}",
                t.name,
                t.dtype,
                t.dtype.block().0
            ),
        }),
        [r, c] => Ok((*r, *c)),
        other => Err(Error::Safetensors {
            path: t.path.clone(),
            msg: format!(
                "tensor `{}` has shape {other:?}, expected a 2-D matrix",
                t.name
            ),
        }),
    }
}

/// `len` bytes are exactly a `rows x cols` matrix of `dtype`.
pub(crate) fn check_matrix_bytes(len: usize, dtype: DType, rows: usize, cols: usize) -> Result<()> {
    let want = dtype.bytes_for(rows * cols);
    if len != want || !dtype.fits_row(cols) {
        return Err(Error::InvalidArgument(format!(
            "matrix of {rows} x {cols} {dtype:?} needs {want} bytes, got {len}"
        )));
    }
    Ok(())
}

/// `Err` for quantized neuron bundles: the neuron-level kernels read float rows and columns.
pub(crate) fn float_neurons(dtype: DType, op: &str) -> Result<()> {
    if dtype.is_quantized() {
        return Err(Error::InvalidArgument(format!(
            "{op}: neuron bundles of {dtype} weights are not supported; sparsity computes on \
             float weights (load the model with --weights bf16)"
        )));
    }
    Ok(())
}

/// A row copy's element offsets `(src, dst, count)`, checked against both buffers' lengths.
pub(crate) fn row_copy_range(
    src_len: usize,
    src_row: usize,
    dst_len: usize,
    dst_row: usize,
    n_rows: usize,
    row_len: usize,
) -> Result<(usize, usize, usize)> {
    let s = src_row * row_len;
    let d = dst_row * row_len;
    let n = n_rows * row_len;
    if s + n > src_len || d + n > dst_len {
        return Err(Error::InvalidArgument(format!(
            "copy of {n_rows} rows of {row_len} out of bounds (src {src_len} elements from row {src_row}, dst {dst_len} elements from row {dst_row})"
        )));
    }
    Ok((s, d, n))
}

/// `bundle_ffn`'s arguments that do not depend on where the buffers live: the bundle matrix
/// splits into `layout`'s parts, a dense pass has gate rows, and per-token lists cover the
/// tokens with ascending offsets and ids that are bundle rows. Returns the hidden size.
pub(crate) fn bundle_call<Buf>(
    cols: usize,
    neurons: usize,
    layout: BundleLayout,
    sel: &BundleSelection<'_, Buf>,
    n_tokens: usize,
) -> Result<usize> {
    let parts = layout.parts();
    if !cols.is_multiple_of(parts) {
        return Err(Error::InvalidArgument(format!(
            "bundle matrix has {cols} columns, not {parts} x hidden"
        )));
    }
    match sel {
        BundleSelection::All { .. } if layout != BundleLayout::GateUpDown => {
            return Err(Error::InvalidArgument(
                "a dense pass over bundles needs their gate rows".into(),
            ));
        }
        BundleSelection::All { .. } => {}
        BundleSelection::PerToken { kept, .. } => {
            let offsets_ok = kept.offsets.first() == Some(&0)
                && kept.offsets.windows(2).all(|w| w[0] <= w[1])
                && kept
                    .offsets
                    .last()
                    .is_some_and(|&end| end <= kept.ids.len());
            if kept.n_tokens() < n_tokens
                || !offsets_ok
                || kept.ids.iter().any(|&i| i as usize >= neurons)
            {
                return Err(Error::InvalidArgument(
                    "neuron lists do not match the tokens or the bundles".into(),
                ));
            }
        }
    }
    Ok(cols / parts)
}

/// One matrix's `(dtype, rows, cols)`, for checks that do not care where it lives.
pub(crate) type MatrixShape = (DType, usize, usize);

/// `scatter_columns`: `src` holds `[n, ids.len()]`, `dst` `[n, width]`, ids ascending and
/// below `width`.
pub(crate) fn scatter_columns(
    src_len: usize,
    n_tokens: usize,
    ids: &[u32],
    dst_len: usize,
    width: usize,
) -> Result<()> {
    if ids.windows(2).any(|w| w[0] >= w[1]) || ids.last().is_some_and(|&i| i as usize >= width) {
        return Err(Error::InvalidArgument(format!(
            "scatter_columns: column ids must be ascending and below {width}"
        )));
    }
    if src_len < n_tokens * ids.len() || dst_len < n_tokens * width {
        return Err(Error::InvalidArgument(format!(
            "scatter_columns: {n_tokens} rows need {} source and {} destination values, \
             buffers hold {src_len} and {dst_len}",
            n_tokens * ids.len(),
            n_tokens * width
        )));
    }
    Ok(())
}

/// `gather_quantized_ffn`'s arguments: gate and up `[f, h]`, down `[h, f]`, neuron ids
/// ascending and below `f`, and a compact down `[h, k]` that `down_dtype` can hold (whole
/// blocks, a format the runtime writes). Returns `(h, f)`.
pub(crate) fn quantized_gather(
    gate: MatrixShape,
    up: MatrixShape,
    down: MatrixShape,
    ids: &[u32],
    down_dtype: DType,
) -> Result<(usize, usize)> {
    let (_, f, h) = gate;
    if (up.1, up.2) != (f, h) || (down.1, down.2) != (h, f) {
        return Err(Error::InvalidArgument(format!(
            "FFN shapes disagree: gate {f}x{h}, up {}x{}, down {}x{} (expected {h}x{f})",
            up.1, up.2, down.1, down.2
        )));
    }
    if !crate::tensor::quantize::writes(down_dtype) {
        return Err(Error::InvalidArgument(format!(
            "Griffin's compact down matrix cannot be written as {down_dtype}: use q8_0, bf16, f16 or f32"
        )));
    }
    if !down_dtype.fits_row(ids.len()) {
        return Err(Error::InvalidArgument(format!(
            "{} neurons are not whole {down_dtype} blocks of {} (Griffin rounds its choice up to a multiple of the block)",
            ids.len(),
            down_dtype.block().0
        )));
    }
    if ids.windows(2).any(|w| w[0] >= w[1]) || ids.last().is_some_and(|&i| i as usize >= f) {
        return Err(Error::InvalidArgument(format!(
            "neuron ids must be ascending and below {f}"
        )));
    }
    Ok((h, f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::NeuronLists;

    fn lists(ids: Vec<u32>, offsets: Vec<usize>) -> NeuronLists {
        NeuronLists { ids, offsets }
    }

    /// `bundle_call` over 4 bundles of `cols` columns, per-token lists `kept` for 2 tokens.
    fn per_token(cols: usize, layout: BundleLayout, kept: &NeuronLists) -> Result<usize> {
        let coeff = vec![0.0f32; 8];
        let sel = BundleSelection::PerToken {
            coeff: &coeff,
            kept,
            up_bias: None,
        };
        bundle_call(cols, 4, layout, &sel, 2)
    }

    #[test]
    fn bundle_calls_are_checked_before_any_kernel() {
        let good = lists(vec![0, 3, 1], vec![0, 2, 3]);
        assert_eq!(per_token(12, BundleLayout::GateUpDown, &good).unwrap(), 4);
        assert_eq!(per_token(12, BundleLayout::UpDown, &good).unwrap(), 6);
        assert!(
            per_token(10, BundleLayout::GateUpDown, &good).is_err(),
            "3 parts"
        );
        let bad = [
            (
                "one token's list for two tokens",
                lists(vec![0], vec![0, 1]),
            ),
            ("an id past the bundles", lists(vec![0, 4], vec![0, 1, 2])),
            ("offsets going back", lists(vec![0, 1, 2], vec![0, 2, 1])),
            ("offsets not from 0", lists(vec![0, 1, 2], vec![1, 2, 3])),
            ("offsets past the ids", lists(vec![0, 1], vec![0, 1, 3])),
            ("no offsets at all", lists(vec![], vec![])),
        ];
        for (what, kept) in &bad {
            assert!(
                per_token(12, BundleLayout::GateUpDown, kept).is_err(),
                "{what}"
            );
        }
        let (gate_bias, up_bias) = (None::<&Vec<f32>>, None);
        let dense = BundleSelection::All { gate_bias, up_bias };
        assert_eq!(
            bundle_call(12, 4, BundleLayout::GateUpDown, &dense, 2).unwrap(),
            4
        );
        assert!(
            bundle_call(12, 4, BundleLayout::UpDown, &dense, 2).is_err(),
            "a dense pass needs the gate rows"
        );
    }
}
