//! The multi-token matmul (`cpu::matmul` with 1-17 tokens: the decode matvec, the streamed
//! small-batch kernels of every ISA tier and the scalar tiled path) against a naive f64
//! reference written here, over awkward sizes: rows and columns around the 4-row groups and
//! the 8 / 16 / 32-lane blocks, every dtype, 1-3 threads, unaligned weights.
//!
//! Weights are drawn as f32 and rounded to the dtype under test; the reference uses the
//! rounded values, so only the kernels' f32 arithmetic is measured. Outputs are poisoned with
//! NaN beforehand (an element left unwritten fails the comparison) and fenced by sentinels
//! that must survive (an element written out of range fails too).

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sirius_offload::backend::cpu::{matmul_with_isa, Isa, ThreadPool};
use sirius_offload::tensor::DType;

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];
/// Fences the output on both sides; must survive every call.
const SENTINEL: f32 = -12345.5;
const FENCE: usize = 19;

/// The tiers this machine runs, saying which are skipped (so a green run on an old CPU does
/// not pass for AVX-512 coverage).
fn tiers() -> Vec<Isa> {
    for isa in Isa::ALL {
        if !isa.is_supported() {
            eprintln!(
                "skipping ISA tier {}: this machine cannot run it",
                isa.name()
            );
        }
    }
    Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
}

/// `shift` junk bytes, then `vals` rounded to `dtype` as little-endian bytes; also returns the
/// rounded values.
fn encode(vals: &[f32], dtype: DType, shift: usize) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = vec![0xA5u8; shift];
    let mut rounded = Vec::with_capacity(vals.len());
    for &v in vals {
        match dtype {
            DType::BF16 => {
                let b = bf16::from_f32(v);
                bytes.extend_from_slice(&b.to_bits().to_le_bytes());
                rounded.push(b.to_f64());
            }
            DType::F16 => {
                let b = f16::from_f32(v);
                bytes.extend_from_slice(&b.to_bits().to_le_bytes());
                rounded.push(b.to_f64());
            }
            DType::F32 => {
                bytes.extend_from_slice(&v.to_le_bytes());
                rounded.push(v as f64);
            }
            q => panic!("encode: {q} is not a float type"),
        }
    }
    (bytes, rounded)
}

/// One problem: weights (rounded and encoded), tokens, and the f64 reference with the sum of
/// |w x| per output that bounds f32 accumulation errors.
struct Case {
    rows: usize,
    cols: usize,
    n: usize,
    dtype: DType,
    shift: usize,
    bytes: Vec<u8>,
    x: Vec<f32>,
    exact: Vec<f64>,
    magnitude: Vec<f64>,
}

impl Case {
    fn random(rng: &mut StdRng, rows: usize, cols: usize, n: usize, dtype: DType) -> Case {
        let vals: Vec<f32> = (0..rows * cols)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        // An odd shift: the kernels must accept weights at any address.
        let shift = 1 + rng.gen_range(0..3) * 2;
        let (bytes, w) = encode(&vals, dtype, shift);
        // Tokens of very different scales, so a token mixed up with another shows.
        let x: Vec<f32> = (0..n * cols)
            .map(|i| rng.gen_range(-1.0f32..1.0) * (1.0 + (i / cols) as f32))
            .collect();
        let mut exact = vec![0f64; n * rows];
        let mut magnitude = vec![0f64; n * rows];
        for t in 0..n {
            for r in 0..rows {
                let (mut s, mut m) = (0f64, 0f64);
                for c in 0..cols {
                    let p = w[r * cols + c] * x[t * cols + c] as f64;
                    s += p;
                    m += p.abs();
                }
                exact[t * rows + r] = s;
                magnitude[t * rows + r] = m;
            }
        }
        Case {
            rows,
            cols,
            n,
            dtype,
            shift,
            bytes,
            x,
            exact,
            magnitude,
        }
    }

    /// Runs the kernel on `isa` with `pool` and checks every output and both fences.
    fn check(&self, isa: Isa, pool: &ThreadPool) {
        let (rows, cols, n) = (self.rows, self.cols, self.n);
        let mut buf = vec![SENTINEL; FENCE + n * rows + FENCE];
        buf[FENCE..FENCE + n * rows].fill(f32::NAN);
        matmul_with_isa(
            isa,
            pool,
            &self.bytes[self.shift..],
            self.dtype,
            rows,
            cols,
            &self.x,
            n,
            &mut buf[FENCE..FENCE + n * rows],
        );
        let what = format!(
            "{} {} {rows}x{cols} n={n} threads={}",
            isa.name(),
            self.dtype,
            pool.n_threads()
        );
        assert!(
            buf[..FENCE]
                .iter()
                .chain(&buf[FENCE + n * rows..])
                .all(|&v| v == SENTINEL),
            "{what}: wrote outside the output"
        );
        // f32 accumulation: errors grow with the number of terms and their magnitudes.
        let eps = f32::EPSILON as f64 * (cols as f64).sqrt().max(4.0);
        for t in 0..n {
            for r in 0..rows {
                let i = t * rows + r;
                let got = buf[FENCE + i] as f64;
                let tol = eps * self.magnitude[i] + 1e-30;
                assert!(
                    (got - self.exact[i]).abs() <= tol,
                    "{what}: token {t} row {r}: got {got}, want {} (tol {tol:e})",
                    self.exact[i]
                );
            }
        }
    }
}

fn pools() -> Vec<ThreadPool> {
    (1..=3).map(ThreadPool::new).collect()
}

/// Every token count 1-17 (the 4-token passes of AVX-512, the 2-token passes of AVX2 and
/// their remainders) over row counts around the 4-row groups and columns around the vector
/// widths and the 32-column bf16 blocks.
#[test]
fn every_token_count_matches_reference() {
    let mut rng = StdRng::seed_from_u64(0xB47C4);
    let shapes = [
        (1, 1),
        (3, 7),
        (4, 16),
        (5, 17),
        (7, 31),
        (8, 32),
        (9, 33),
        (13, 63),
        (17, 65),
        (6, 100),
    ];
    let (tiers, pools) = (tiers(), pools());
    for dtype in DTYPES {
        for &(rows, cols) in &shapes {
            for n in 1..=17 {
                let case = Case::random(&mut rng, rows, cols, n, dtype);
                for &isa in &tiers {
                    for pool in &pools {
                        case.check(isa, pool);
                    }
                }
            }
        }
    }
}

/// Matrices large enough to be split into several row chunks per thread (and several 4-row
/// groups per chunk, with a remainder), prefetching past the last row included.
#[test]
fn multi_task_shapes_match_reference() {
    let mut rng = StdRng::seed_from_u64(0x5EED);
    let shapes = [(1030, 67), (131, 577), (66, 1031)];
    let (tiers, pools) = (tiers(), pools());
    for dtype in DTYPES {
        for &(rows, cols) in &shapes {
            for n in [1, 2, 3, 4, 5, 8, 11, 16] {
                let case = Case::random(&mut rng, rows, cols, n, dtype);
                for &isa in &tiers {
                    for pool in &pools[1..] {
                        case.check(isa, pool);
                    }
                }
            }
        }
    }
}

/// A NaN in one token's activations reaches every output of that token and none of the
/// others (the kernels must not mix tokens, e.g. in their padded tails).
#[test]
fn a_nan_token_does_not_leak_into_others() {
    let (rows, cols, n) = (9, 40, 6);
    let mut rng = StdRng::seed_from_u64(3);
    let pool = ThreadPool::new(2);
    for dtype in DTYPES {
        let mut case = Case::random(&mut rng, rows, cols, n, dtype);
        case.x[2 * cols + 5] = f32::NAN;
        for &isa in &tiers() {
            let mut y = vec![0f32; n * rows];
            matmul_with_isa(
                isa,
                &pool,
                &case.bytes[case.shift..],
                dtype,
                rows,
                cols,
                &case.x,
                n,
                &mut y,
            );
            for t in 0..n {
                for r in 0..rows {
                    let v = y[t * rows + r];
                    assert_eq!(
                        v.is_nan(),
                        t == 2,
                        "{} {dtype}: token {t} row {r} = {v}",
                        isa.name()
                    );
                }
            }
        }
    }
}
