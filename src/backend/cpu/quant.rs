//! Products with quantized weight matrices (ggml block formats, see `tensor::quant`).
//!
//! Decode (one token) is a stream over the weights, so it runs on the blocks as stored: the
//! activations are quantized to 8 bits (one f32 scale per block of 32, plus the block's scaled
//! sum for the formats with a minimum; per super-block of 256 with sums per 16 for the
//! K-quants), and each weight block meets its activations in an integer dot product (AVX2
//! `maddubs`, or the scalar reference). Batches (prefill, Sirius windows) convert blocks of
//! weight rows to f32 once (SIMD, bit-equal to the reference) and reuse them for up to 64
//! tokens in the float GEMM. Q5_K takes the reference de-quantization on both paths.

use std::cell::RefCell;

#[cfg(target_arch = "x86_64")]
use super::avx2::Avx2;
use super::kernels::Kernels;
#[cfg(target_arch = "x86_64")]
use super::quant_avx2;
#[cfg(target_arch = "x86_64")]
use super::quant_k_avx2;
use super::quant_packed::{PackedRows, GROUP};
#[cfg(target_arch = "x86_64")]
use super::quant_packed_avx2;
use super::util::SharedMut;
use crate::tensor::quant::{dequantize, f16_at as f16};
use crate::tensor::DType;

/// Elements per activation block (and per block of Q4_0, Q4_1, Q8_0).
pub(super) const QK: usize = 32;

/// One token's activations quantized per block of `per` elements (32, or 256 for the
/// K-quants, whose super-blocks then need one activation scale): `x[i] ~ d[i / per] * qs[i]`.
#[derive(Default)]
pub(super) struct Q8Row {
    pub qs: Vec<i8>,
    /// Scale per block.
    pub d: Vec<f32>,
    /// `d * sum(qs)` per block (what a weight block's minimum multiplies).
    pub s: Vec<f32>,
    /// The sum of each 16 quants (the K-quants' minima and offsets multiply these).
    pub bsums: Vec<i32>,
    /// Elements per block.
    pub per: usize,
    /// What was quantized, and within which bound: q, k and v (gate and up) of a layer
    /// multiply the same activations, which are then quantized once.
    source: Vec<f32>,
    limit: f32,
}

impl Q8Row {
    /// Quantizes `x` (a whole number of blocks of `per`) in place of the previous contents.
    pub(super) fn quantize(&mut self, x: &[f32], per: usize) {
        self.quantize_within(x, per, 127.0);
    }

    /// [`Q8Row::quantize`] to quants within `+-limit` (<= 127).
    pub(super) fn quantize_within(&mut self, x: &[f32], per: usize, limit: f32) {
        if self.per == per && self.limit == limit && self.source == x {
            return;
        }
        self.source.clear();
        self.source.extend_from_slice(x);
        self.limit = limit;
        let nb = x.len() / per;
        self.per = per;
        self.qs.resize(nb * per, 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.bsums.resize(nb * per / 16, 0);
        for (b, (xs, qs)) in x
            .chunks_exact(per)
            .zip(self.qs.chunks_exact_mut(per))
            .enumerate()
        {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / limit;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let sixteens = &mut self.bsums[b * per / 16..(b + 1) * per / 16];
            for ((q16, x16), bsum) in qs
                .chunks_exact_mut(16)
                .zip(xs.chunks_exact(16))
                .zip(sixteens.iter_mut())
            {
                let mut sum = 0i32;
                for (q, v) in q16.iter_mut().zip(x16) {
                    // Half away from zero, as `round` (a libm call) does, but inlined.
                    let r = v * inv;
                    *q = (r + 0.5f32.copysign(r)) as i8;
                    sum += *q as i32;
                }
                *bsum = sum;
            }
            self.d[b] = d;
            self.s[b] = d * sixteens.iter().sum::<i32>() as f32;
        }
    }
}

/// Activation elements per scale for `dtype`'s integer dot products.
pub(super) fn activation_block(dtype: DType) -> usize {
    match dtype {
        DType::Q4K | DType::Q6K => 256,
        _ => QK,
    }
}

thread_local! {
    static X_Q8: RefCell<Q8Row> = RefCell::new(Q8Row::default());
    static ROW_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The tier the quantized kernels run at: the AVX-512 tier includes AVX2's features.
#[derive(Clone, Copy)]
pub(super) enum Tier {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
}

pub(super) fn tier(k: Kernels) -> Tier {
    match k {
        Kernels::Scalar => Tier::Scalar,
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx2(p) => Tier::Avx2(p),
        #[cfg(target_arch = "x86_64")]
        Kernels::Avx512(_) => Avx2::detect().map_or(Tier::Scalar, Tier::Avx2),
    }
}

/// Whether decode uses the integer dot products for `dtype` (else de-quantized rows with
/// f32 activations: Q5_K). A Q8_0 LM head is the exception the caller asks for (`exact`):
/// 8-bit activations there flip near-tie picks (see `quant_logits`).
pub(super) fn has_int_dot(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q4_0 | DType::Q4_1 | DType::Q8_0 | DType::Q4K | DType::Q6K
    )
}

/// `y = w x` for one token: rows of `w` (`rows x cols` of a quantized `dtype`) split into
/// `n_tasks` chunks on `pool`; with `exact`, de-quantized rows times f32 activations.
#[allow(clippy::too_many_arguments)]
pub(super) fn matvec(
    k: Kernels,
    pool: &super::pool::ThreadPool,
    w: &[u8],
    dtype: DType,
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
    n_tasks: usize,
    exact: bool,
) {
    let row_bytes = dtype.bytes_for(cols);
    let t = tier(k);
    let chunk = rows.div_ceil(n_tasks.max(1)).max(1);
    let n_tasks = rows.div_ceil(chunk);
    let ys = SharedMut::new(y);
    let run = |xq: Option<&Q8Row>| {
        pool.run(n_tasks, &|task| {
            let r0 = task * chunk;
            let nr = chunk.min(rows - r0);
            // SAFETY: task `task` alone owns rows r0..r0 + nr.
            let yt = unsafe { ys.slice(r0, nr) };
            let rows_bytes = &w[r0 * row_bytes..(r0 + nr) * row_bytes];
            match xq {
                Some(xq) => dot_q8_rows(t, dtype, rows_bytes, row_bytes, xq, yt),
                // The products a head's exact rescoring computes (`quant_logits`), bit for bit.
                None if dtype == DType::Q8_0 => {
                    for (out, row) in yt.iter_mut().zip(rows_bytes.chunks_exact(row_bytes)) {
                        *out = dot_q8_f32_row(k, row, x);
                    }
                }
                None => ROW_F32.with_borrow_mut(|buf| {
                    buf.resize(cols, 0.0);
                    for (out, row) in yt.iter_mut().zip(rows_bytes.chunks_exact(row_bytes)) {
                        dequantize(dtype, row, buf);
                        *out = buf.iter().zip(x).map(|(a, b)| a * b).sum();
                    }
                }),
            }
        })
    };
    if has_int_dot(dtype) && !exact {
        X_Q8.with_borrow_mut(|xq| {
            xq.quantize(x, activation_block(dtype));
            run(Some(xq));
        });
    } else {
        run(None);
    }
}

/// `y = w x` for one token with `w` in the interleaved layout (`quant_packed`), groups of 8
/// rows split into `n_tasks` chunks on `pool`; with `bounds` (a Q8_0 LM head, see
/// `quant_logits`), each row's error bound too. False (nothing done) on a tier without the
/// kernel: the caller then takes the stored rows.
pub(super) fn matvec_packed(
    k: Kernels,
    pool: &super::pool::ThreadPool,
    w: &PackedRows,
    x: &[f32],
    y: &mut [f32],
    bounds: Option<&mut [f32]>,
    n_tasks: usize,
) -> bool {
    assert!(
        bounds.is_none() || w.dtype() == DType::Q8_0,
        "bounds are a Q8_0 head's"
    );
    #[cfg(target_arch = "x86_64")]
    if let Tier::Avx2(_) = tier(k) {
        let groups = w.rows() / GROUP;
        let chunk = groups.div_ceil(n_tasks.max(1)).max(1);
        let ys = SharedMut::new(y);
        let bs = bounds.map(SharedMut::new);
        X_Q8.with_borrow_mut(|xq| {
            // The head's bounds come with its paired (7-bit) kernel: see `quant_packed_avx2`.
            let limit = if bs.is_some() {
                HEAD_ACTIVATION_LIMIT
            } else {
                127.0
            };
            xq.quantize_within(x, QK, limit);
            pool.run(groups.div_ceil(chunk), &|task| {
                let (g0, cells) = (task * chunk, w.blocks());
                let ng = chunk.min(groups - g0);
                let (r0, nr) = (g0 * GROUP, ng * GROUP);
                // SAFETY: task `task` alone owns rows r0..r0 + nr of the outputs.
                let yt = unsafe { ys.slice(r0, nr) };
                // SAFETY (both kernels): the proof says this CPU runs AVX2/FMA/F16C; the
                // kernels assert the lengths.
                match &bs {
                    // SAFETY: as for `yt`.
                    Some(bs) => unsafe {
                        let bt = bs.slice(r0, nr);
                        quant_packed_avx2::head_groups(w.groups(g0, ng), cells, xq, yt, bt)
                    },
                    None => unsafe {
                        quant_packed_avx2::dot_groups(w.dtype(), w.groups(g0, ng), cells, xq, yt)
                    },
                }
            })
        });
        return true;
    }
    let _ = (k, pool, w, x, y, bounds, n_tasks);
    false
}

/// The activation quants' bound of a Q8_0 LM head's products (`quant_logits`): its kernel
/// sums two chunks in 16 bits, which needs activations within +-63.
pub(super) const HEAD_ACTIVATION_LIMIT: f32 = 63.0;

/// Weight rows (of Q4_0, Q4_1 or Q8_0 blocks, `row_bytes` apart) dotted with quantized
/// activations into `y`.
pub(super) fn dot_q8_rows(
    t: Tier,
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    x: &Q8Row,
    y: &mut [f32],
) {
    match t {
        // SAFETY: the proof says this CPU runs AVX2/FMA/F16C; the kernel asserts the lengths.
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2(_) if matches!(dtype, DType::Q4K | DType::Q6K) => unsafe {
            quant_k_avx2::dot_rows(dtype, rows, row_bytes, x, y)
        },
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2(_) => unsafe {
            quant_packed_avx2::dot_stored_rows(dtype, rows, row_bytes, x, y)
        },
        Tier::Scalar => {
            for (out, row) in y.iter_mut().zip(rows.chunks_exact(row_bytes)) {
                *out = dot_scalar(dtype, row, x);
            }
        }
    }
}

/// One Q8_0 row dotted with exact f32 activations (as the decode matvec computes it).
pub(super) fn dot_q8_f32_row(k: Kernels, row: &[u8], x: &[f32]) -> f32 {
    let mut y = [0f32];
    match tier(k) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the proof says this CPU runs AVX2/FMA/F16C; the kernel asserts the lengths.
        Tier::Avx2(_) => unsafe { quant_avx2::dot_rows_q8_f32(row, row.len(), x, &mut y) },
        Tier::Scalar => ROW_F32.with_borrow_mut(|buf| {
            buf.resize(x.len(), 0.0);
            dequantize(DType::Q8_0, row, buf);
            y[0] = buf.iter().zip(x).map(|(a, b)| a * b).sum();
        }),
    }
    y[0]
}

/// The scalar reference of [`dot_q8_rows`], one row: integer sums per block, scaled as ggml does.
pub(super) fn dot_scalar(dtype: DType, row: &[u8], x: &Q8Row) -> f32 {
    if matches!(dtype, DType::Q4K | DType::Q6K) {
        // Super-blocks of 256: the reference de-quantization against the 8-bit activations.
        let mut w = [0f32; 256];
        let mut sum = 0f32;
        for (s, blk) in row.chunks_exact(dtype.block().1).enumerate() {
            dequantize(dtype, blk, &mut w);
            for (i, wv) in w.iter().enumerate() {
                let at = 256 * s + i;
                sum += wv * x.qs[at] as f32 * x.d[at / x.per];
            }
        }
        return sum;
    }
    let (_, bb) = dtype.block();
    let mut sum = 0f32;
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let xs = &x.qs[b * QK..(b + 1) * QK];
        let nibbles = |qs: &[u8]| -> i32 {
            (0..16)
                .map(|j| {
                    (qs[j] & 0xF) as i32 * xs[j] as i32 + (qs[j] >> 4) as i32 * xs[j + 16] as i32
                })
                .sum()
        };
        let d = f16(blk, 0);
        sum += match dtype {
            // Unsigned nibbles, the -8 offset applied through the block sum.
            DType::Q4_0 => d * x.d[b] * nibbles(&blk[2..18]) as f32 - 8.0 * d * x.s[b],
            DType::Q4_1 => d * x.d[b] * nibbles(&blk[4..20]) as f32 + f16(blk, 2) * x.s[b],
            DType::Q8_0 => {
                let dot: i32 = blk[2..34]
                    .iter()
                    .zip(xs)
                    .map(|(&w, &v)| (w as i8) as i32 * v as i32)
                    .sum();
                d * x.d[b] * dot as f32
            }
            _ => 0.0,
        };
    }
    sum
}

/// `out = w` as f32 for a run of whole blocks (the GEMM's row conversion, the embedding).
pub(super) fn convert(k: Kernels, src: &[u8], dtype: DType, out: &mut [f32]) {
    match tier(k) {
        // SAFETY: the proof says this CPU runs AVX2/FMA/F16C; `convert_blocks` checks lengths.
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2(_) if matches!(dtype, DType::Q4K | DType::Q6K) => unsafe {
            quant_k_avx2::convert(dtype, src, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Tier::Avx2(_) if matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0) => unsafe {
            quant_avx2::convert(dtype, src, out)
        },
        _ => {
            dequantize(dtype, src, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::Isa;
    use crate::backend::cpu::matmul::matmul_with;
    use crate::backend::cpu::pool::ThreadPool;
    use crate::backend::cpu::util::TestRng;
    use crate::tensor::quant::tests::reference_blocks;

    const FORMATS: [DType; 6] = [
        DType::Q4_0,
        DType::Q4_1,
        DType::Q8_0,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];

    /// Every tier's matmul (decode and batches) against the de-quantized weights in f64: the
    /// only error left is the 8-bit activations' (decode) or none beyond f32 sums (batches).
    #[test]
    fn products_match_the_dequantized_weights() {
        let mut rng = TestRng::new(11);
        let pool = ThreadPool::new(2);
        for dtype in FORMATS {
            let (rows, cols) = (9, 512);
            let bytes = reference_blocks(dtype, rows * cols / dtype.block().0);
            let mut w = vec![0f32; rows * cols];
            assert!(dequantize(dtype, &bytes, &mut w));
            for n in [1, 3] {
                let x = rng.vec(n * cols);
                for isa in Isa::available() {
                    let k = Kernels::new(isa);
                    let mut y = vec![f32::NAN; n * rows];
                    matmul_with(k, &pool, &bytes, dtype, rows, cols, &x, n, &mut y);
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let norm: f64 =
                            xt.iter().map(|v| (*v as f64).abs()).sum::<f64>() / cols as f64;
                        for r in 0..rows {
                            let wr = &w[r * cols..(r + 1) * cols];
                            let want: f64 =
                                wr.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                            let scale: f64 =
                                wr.iter().map(|v| (*v as f64).abs()).sum::<f64>() * norm;
                            let got = y[t * rows + r] as f64;
                            let tol = if n <= super::super::quant_batch::MAX_TOKENS
                                && has_int_dot(dtype)
                            {
                                0.02
                            } else {
                                1e-5
                            };
                            assert!(
                                (got - want).abs() <= tol * scale.max(1e-3),
                                "{isa:?} {dtype} n={n} t={t} r={r}: {got} vs {want} (scale {scale})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn conversion_is_bit_equal_to_the_reference() {
        for dtype in FORMATS {
            let bytes = reference_blocks(dtype, 8);
            let mut want = vec![0f32; 8 * dtype.block().0];
            assert!(dequantize(dtype, &bytes, &mut want));
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; want.len()];
                convert(Kernels::new(isa), &bytes, dtype, &mut got);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} {dtype}"
                );
            }
        }
    }

    /// Every tier's integer products equal the scalar reference on the same quantized
    /// activations up to f32 summation order (the tolerance above is the activations').
    #[test]
    fn tiers_match_the_scalar_reference_on_the_same_activations() {
        let mut rng = TestRng::new(17);
        for dtype in [
            DType::Q4_0,
            DType::Q4_1,
            DType::Q8_0,
            DType::Q4K,
            DType::Q6K,
        ] {
            let (rows, cols) = (7, 1024);
            let bytes = reference_blocks(dtype, rows * cols / dtype.block().0);
            let row_bytes = dtype.bytes_for(cols);
            let mut xq = Q8Row::default();
            xq.quantize(&rng.vec(cols), activation_block(dtype));
            let want: Vec<f32> = bytes
                .chunks_exact(row_bytes)
                .map(|r| dot_scalar(dtype, r, &xq))
                .collect();
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; rows];
                dot_q8_rows(
                    tier(Kernels::new(isa)),
                    dtype,
                    &bytes,
                    row_bytes,
                    &xq,
                    &mut got,
                );
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{isa:?} {dtype}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// The interleaved decode layout gives the stored rows' products (the scalar reference
    /// on the same activations, up to f32 summation order), split over tasks unevenly.
    #[test]
    fn packed_rows_give_the_stored_rows_products() {
        let mut rng = TestRng::new(29);
        let pool = ThreadPool::new(2);
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            let (rows, cols) = (40, 512);
            let bytes = reference_blocks(dtype, rows * cols / QK);
            let packed = PackedRows::pack(dtype, &bytes, rows, cols).expect("packs");
            let x = rng.vec(cols);
            let mut xq = Q8Row::default();
            xq.quantize(&x, QK);
            let want: Vec<f32> = bytes
                .chunks_exact(dtype.bytes_for(cols))
                .map(|r| dot_scalar(dtype, r, &xq))
                .collect();
            for isa in Isa::available() {
                let mut y = vec![f32::NAN; rows];
                if !matvec_packed(Kernels::new(isa), &pool, &packed, &x, &mut y, None, 3) {
                    eprintln!("{isa:?}: no interleaved kernel on this tier (stored rows are used)");
                    continue;
                }
                for (g, w) in y.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{isa:?} {dtype}: {g} vs {w}"
                    );
                }
                // The stored rows through their own kernel: bit-equal, a short last group too.
                let n = rows - 3;
                let mut stored = vec![f32::NAN; n];
                let row_bytes = dtype.bytes_for(cols);
                dot_q8_rows(
                    tier(Kernels::new(isa)),
                    dtype,
                    &bytes,
                    row_bytes,
                    &xq,
                    &mut stored,
                );
                for (r, (a, b)) in stored.iter().zip(&y).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{isa:?} {dtype} row {r}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// The K-quants' activations: one scale per 256, sums per 16.
    #[test]
    fn activations_per_super_block() {
        let mut rng = TestRng::new(5);
        let x = rng.vec(512);
        let mut q = Q8Row::default();
        q.quantize(&x, 256);
        assert_eq!((q.d.len(), q.bsums.len(), q.per), (2, 32, 256));
        for (i, v) in x.iter().enumerate() {
            let d = q.d[i / 256];
            assert!((q.qs[i] as f32 * d - v).abs() <= 0.5 * d + 1e-7, "{i}");
        }
        assert_eq!(
            q.bsums[5],
            q.qs[80..96].iter().map(|&v| v as i32).sum::<i32>()
        );
    }

    #[test]
    fn activations_round_trip_within_half_a_step() {
        let mut rng = TestRng::new(3);
        let mut x = rng.vec(96);
        x[40..72].fill(0.0);
        let mut q = Q8Row::default();
        q.quantize(&x, QK);
        for (i, v) in x.iter().enumerate() {
            let d = q.d[i / QK];
            assert!((q.qs[i] as f32 * d - v).abs() <= 0.5 * d + 1e-7, "{i}");
        }
        let sixteens: Vec<i32> =
            q.qs.chunks(16)
                .map(|c| c.iter().map(|&v| v as i32).sum())
                .collect();
        assert_eq!(q.bsums, sixteens);
        assert_eq!(
            (q.d[1], q.s[1]),
            (
                q.d[1],
                q.d[1] * q.qs[32..64].iter().map(|&v| v as i32).sum::<i32>() as f32
            )
        );
    }
}
