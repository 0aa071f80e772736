//! Griffin's compact FFN gathered straight out of quantized matrices.
//!
//! A neuron's gate and up rows are whole rows of blocks: they are copied as stored. Its down
//! column is not contiguous in any ggml format (blocks run along the neuron axis), so the
//! compact down `[h, k]` is rebuilt: each row of down is de-quantized (exact), the kept
//! neurons' values picked out and the row re-encoded in the format the caller asks for
//! (Q8_0 by default: a second rounding of at most half a step of 1/127 of the block's
//! largest value; f32 keeps the de-quantized values exactly).

use std::cell::RefCell;

use super::kernels::Kernels;
use super::pool::ThreadPool;
use super::quant::convert;
use super::util::{with_scratch_vec, SharedMut};
use crate::tensor::quantize::quantize;
use crate::tensor::DType;

thread_local! {
    static DOWN_ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One layer's FFN as stored: gate and up `[f, h]`, down `[h, f]`.
pub struct QuantizedFfn<'a> {
    pub gate: (&'a [u8], DType),
    pub up: (&'a [u8], DType),
    pub down: (&'a [u8], DType),
    pub hidden: usize,
    pub neurons: usize,
}

/// `(gate [k, h], up [k, h] as stored, down [h, k] in down_dtype)` for the neurons `ids`
/// (ascending, below `f`; `k` whole blocks of `down_dtype`, checked by the caller).
pub(super) fn gather_quantized_ffn(
    k: Kernels,
    pool: &ThreadPool,
    w: QuantizedFfn<'_>,
    ids: &[u32],
    down_dtype: DType,
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (h, f) = (w.hidden, w.neurons);
    let copy_rows = |(bytes, dtype): (&[u8], DType)| {
        let row = dtype.bytes_for(h);
        let mut out = Vec::with_capacity(ids.len() * row);
        for &i in ids {
            out.extend_from_slice(&bytes[i as usize * row..(i as usize + 1) * row]);
        }
        out
    };
    let (gate, up) = (copy_rows(w.gate), copy_rows(w.up));

    let (down_src, src_dtype) = w.down;
    let src_row = src_dtype.bytes_for(f);
    let out_row = down_dtype.bytes_for(ids.len());
    let mut down = vec![0u8; h * out_row];
    let n_tasks = (pool.n_threads() * 4).min(h).max(1);
    let chunk = h.div_ceil(n_tasks);
    let shared = SharedMut::new(&mut down);
    pool.run(h.div_ceil(chunk), &|task| {
        let r0 = task * chunk;
        let nr = chunk.min(h - r0);
        // SAFETY: task `task` alone writes rows r0..r0 + nr.
        let dst = unsafe { shared.slice(r0 * out_row, nr * out_row) };
        with_scratch_vec(&DOWN_ROW, |buf| {
            buf.resize(f + ids.len(), 0.0);
            let (row, picked) = buf.split_at_mut(f);
            for (r, out) in (r0..r0 + nr).zip(dst.chunks_exact_mut(out_row)) {
                convert(k, &down_src[r * src_row..(r + 1) * src_row], src_dtype, row);
                for (p, &i) in picked.iter_mut().zip(ids) {
                    *p = row[i as usize];
                }
                quantize(down_dtype, picked, out);
            }
        });
    });
    (gate, up, down)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::Isa;
    use crate::tensor::quant::dequantize;
    use crate::tensor::quant::tests::reference_blocks;

    /// Gate/up rows come out byte-equal; down's kept columns equal the de-quantized source
    /// exactly in f32 and within Q8_0's half step otherwise, on every tier.
    #[test]
    fn gathers_rows_as_stored_and_columns_re_encoded() {
        let (h, f) = (64, 256);
        let gate = reference_blocks(DType::Q4_1, h * f / 32);
        let up = reference_blocks(DType::Q4_0, h * f / 32);
        let down = reference_blocks(DType::Q4K, h * f / 256);
        let mut full = vec![0f32; h * f];
        assert!(dequantize(DType::Q4K, &down, &mut full));
        let ids: Vec<u32> = (0..f as u32).filter(|i| i % 3 != 1).take(64).collect();
        let pool = ThreadPool::new(2);
        for isa in Isa::available() {
            for down_dtype in [DType::F32, DType::Q8_0] {
                let w = QuantizedFfn {
                    gate: (&gate, DType::Q4_1),
                    up: (&up, DType::Q4_0),
                    down: (&down, DType::Q4K),
                    hidden: h,
                    neurons: f,
                };
                let (g, u, d) = gather_quantized_ffn(Kernels::new(isa), &pool, w, &ids, down_dtype);
                let row = DType::Q4_1.bytes_for(h);
                for (j, &i) in ids.iter().enumerate() {
                    let i = i as usize;
                    assert_eq!(g[j * row..(j + 1) * row], gate[i * row..(i + 1) * row]);
                    let urow = DType::Q4_0.bytes_for(h);
                    assert_eq!(u[j * urow..(j + 1) * urow], up[i * urow..(i + 1) * urow]);
                }
                let mut got = vec![0f32; h * ids.len()];
                assert!(dequantize(down_dtype, &d, &mut got));
                for r in 0..h {
                    let want: Vec<f32> = ids.iter().map(|&i| full[r * f + i as usize]).collect();
                    let got = &got[r * ids.len()..(r + 1) * ids.len()];
                    for (b, (w, g)) in want.chunks(32).zip(got.chunks(32)).enumerate() {
                        let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let tol = if down_dtype == DType::F32 {
                            0.0
                        } else {
                            amax / 127.0 * 0.57
                        };
                        for (a, c) in w.iter().zip(g) {
                            assert!(
                                (a - c).abs() <= tol,
                                "{isa:?} {down_dtype:?} row {r} block {b}: {a} vs {c}"
                            );
                        }
                    }
                }
            }
        }
    }
}
