//! Tests of `matmul`: every path against f64 references, on every tier.

use super::*;
use crate::backend::cpu::isa::Isa;
use crate::backend::cpu::util::TestRng;

/// Stores `vals` as `dtype` bytes behind `offset` junk bytes (to test unaligned input);
/// returns the buffer and the values as the kernels will read them back.
pub(crate) fn encode(vals: &[f32], dtype: DType, offset: usize) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = vec![0xAB; offset];
    let mut exact = Vec::with_capacity(vals.len());
    for &v in vals {
        match dtype {
            DType::F32 => {
                bytes.extend_from_slice(&v.to_le_bytes());
                exact.push(v);
            }
            DType::F16 => {
                let h = half::f16::from_f32(v);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                exact.push(h.to_f32());
            }
            DType::BF16 => {
                let h = half::bf16::from_f32(v);
                bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                exact.push(h.to_f32());
            }
            q => panic!("encode: {q} is not a float type (quant.rs tests the formats)"),
        }
    }
    (bytes, exact)
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Checks `y` against an f64 reference with an error bound scaled by sum |w| |x|, which is
/// what f32 accumulation errors are proportional to.
fn check(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize, y: &[f32], what: &str) {
    for t in 0..n {
        for r in 0..rows {
            let (mut exact, mut mag) = (0f64, 0f64);
            for c in 0..cols {
                let p = w[r * cols + c] as f64 * x[t * cols + c] as f64;
                exact += p;
                mag += p.abs();
            }
            let got = y[t * rows + r] as f64;
            let tol = 1e-6 * (cols as f64).sqrt().max(4.0) * mag + 1e-30;
            assert!(
                (got - exact).abs() <= tol,
                "{what}: t={t} r={r}: got {got}, want {exact} (tol {tol})"
            );
        }
    }
}

fn run_case(
    rng: &mut TestRng,
    isa: Isa,
    pool: &ThreadPool,
    dtype: DType,
    rows: usize,
    cols: usize,
    n: usize,
) {
    let k = Kernels::new(isa);
    let vals = rng.vec(rows * cols);
    let x = rng.vec(n * cols);
    for offset in [0, 1] {
        let (bytes, exact) = encode(&vals, dtype, offset);
        let mut y = vec![f32::NAN; n * rows];
        matmul_with(k, pool, &bytes[offset..], dtype, rows, cols, &x, n, &mut y);
        let what = format!(
            "{isa:?} {dtype} {rows}x{cols} n={n} off={offset} threads={}",
            pool.n_threads()
        );
        check(&exact, &x, rows, cols, n, &y, &what);
    }
}

#[test]
fn matmul_matches_reference_all_tiers() {
    let mut rng = TestRng::new(7);
    let shapes = [
        (1, 1),
        (1, 17),
        (3, 5),
        (7, 33),
        (4, 64),
        (5, 31),
        (13, 100),
        (513, 67),
        (64, 576),
        (33, 2100),
    ];
    for threads in [1, 2, 3] {
        let pool = ThreadPool::new(threads);
        for isa in Isa::available() {
            for dtype in DTYPES {
                for &(rows, cols) in &shapes {
                    for n in [1, 2, 4, 5, 8, 9] {
                        run_case(&mut rng, isa, &pool, dtype, rows, cols, n);
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_random_shapes() {
    let mut rng = TestRng::new(11);
    let pool = ThreadPool::new(2);
    for _ in 0..60 {
        let rows = 1 + rng.below(200);
        let cols = 1 + rng.below(300);
        let n = 1 + rng.below(70);
        let isas = Isa::available();
        let isa = isas[rng.below(isas.len())];
        let dtype = DTYPES[rng.below(3)];
        run_case(&mut rng, isa, &pool, dtype, rows, cols, n);
    }
}

#[test]
fn large_matvec_splits_across_tasks() {
    let mut rng = TestRng::new(3);
    let pool = ThreadPool::new(3);
    for isa in Isa::available() {
        run_case(&mut rng, isa, &pool, DType::BF16, 1500, 577, 1);
        run_case(&mut rng, isa, &pool, DType::F16, 130, 4099, 3);
    }
}

#[test]
fn many_tokens_all_paths() {
    // Crosses the AVX2 streamed/tiled switch (64 tokens) and the streamed token blocks.
    let mut rng = TestRng::new(13);
    let pool = ThreadPool::new(2);
    for isa in Isa::available() {
        for dtype in DTYPES {
            run_case(&mut rng, isa, &pool, dtype, 37, 301, 130);
        }
        // Wide rows: only a few tokens fit one streamed token block.
        run_case(&mut rng, isa, &pool, DType::BF16, 9, 20000, 13);
    }
}

/// The x layout `Kernels::prep_x_tokens` must produce, element by element: each token
/// zero padded to whole blocks, bf16 blocks split into their even then odd columns.
fn reference_layout(k: Kernels, dtype: DType, x: &[f32], cols: usize) -> Vec<f32> {
    let block = k.layout().bf16_block.unwrap_or(1);
    let stride = cols.div_ceil(block) * block;
    let mut out = vec![0.0; x.len() / cols.max(1) * stride];
    for (dst, src) in out.chunks_exact_mut(stride).zip(x.chunks_exact(cols)) {
        for (j, &v) in src.iter().enumerate() {
            let (b, i) = (j / block, j % block);
            let split = dtype == DType::BF16 && block > 1;
            let at = if split {
                (i % 2) * block / 2 + i / 2
            } else {
                i
            };
            dst[b * block + at] = v;
        }
    }
    out
}

#[test]
fn prep_x_tokens_lays_out_tokens() {
    let mut rng = TestRng::new(17);
    for isa in Isa::available() {
        let k = Kernels::new(isa);
        for dtype in DTYPES {
            for cols in [1, 5, 15, 16, 17, 31, 32, 33, 64, 100] {
                for n in [1, 2, 5] {
                    let x = rng.vec(n * cols);
                    let want = reference_layout(k, dtype, &x, cols);
                    let mut got = vec![f32::NAN; 7];
                    let stride = k.prep_x_tokens(dtype, &x, n, cols, &mut got);
                    assert_eq!(stride * n, want.len(), "{isa:?} {dtype} {cols} {n}");
                    assert_eq!(got, want, "{isa:?} {dtype} {cols} {n}");
                    // A reused, larger buffer holding junk gives the same.
                    got.iter_mut().for_each(|v| *v = f32::NAN);
                    got.resize(got.len() + 40, f32::NAN);
                    k.prep_x_tokens(dtype, &x, n, cols, &mut got);
                    assert_eq!(got, want, "{isa:?} {dtype} {cols} {n} reused");
                }
            }
        }
    }
}

#[test]
fn conversions_match_half() {
    let mut rng = TestRng::new(5);
    for isa in Isa::available() {
        let k = Kernels::new(isa);
        for dtype in DTYPES {
            for n in [0, 1, 7, 8, 15, 16, 17, 33, 100] {
                let vals: Vec<f32> = rng.vec(n).iter().map(|v| v * 1000.0).collect();
                let (bytes, exact) = encode(&vals, dtype, 1);
                assert_eq!(
                    to_f32_vec_with(k, &bytes[1..], dtype),
                    exact,
                    "{isa:?} {dtype} n={n}"
                );
                if n > 0 {
                    let cols = n.div_ceil(3);
                    let rows = n / cols;
                    for row in 0..rows {
                        let mut out = vec![0.0; cols];
                        row_to_f32_with(k, &bytes[1..], dtype, cols, row, &mut out);
                        assert_eq!(out, exact[row * cols..(row + 1) * cols]);
                    }
                }
            }
        }
    }
}

#[test]
fn special_values_survive_conversion() {
    let vals = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        65504.0,
        -2.5,
    ];
    for isa in Isa::available() {
        let k = Kernels::new(isa);
        for dtype in DTYPES {
            let (bytes, exact) = encode(&vals, dtype, 0);
            let got = to_f32_vec_with(k, &bytes, dtype);
            for (g, e) in got.iter().zip(&exact) {
                assert_eq!(g.to_bits(), e.to_bits(), "{isa:?} {dtype}");
            }
        }
    }
}
