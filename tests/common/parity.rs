//! The per-op parity harness: every backend op over a table of shapes and dtypes, run on a
//! backend under test and on a reference backend over the same random inputs, and compared
//! whole (tests/op_parity.rs: each SIMD tier of the CPU against its scalar tier;
//! tests/gpu_parity.rs: CUDA against the CPU).
//!
//! Every output buffer starts POISONED (NaN) on both backends, one row or more past what the
//! op should write, and whole buffers are compared with NaN matching only NaN: an element the
//! backend failed to write, or wrote past its rows, fails. In-place ops get tails that must
//! stay as they were. The error of a comparison is `max |cand - ref| / max(1, max |ref|)`,
//! against a tolerance per kind of arithmetic (the constants below); every check prints
//! `PARITY <op> <case> err=<e> tol=<t>` to stderr.

use std::io::Write;

use sirius_offload::backend::{
    AttentionShape, Backend, BundleLayout, BundleSelection, NeuronLists, NeuronRule, RopeTable,
    Rows, SparseOps,
};
use sirius_offload::config::ModelConfig;
use sirius_offload::model::rope::rope_frequencies;
use sirius_offload::tensor::{DType, KvDType, TreeMask};

use super::{Rng, TinySpec};

/// A backend under test and its reference; `label` starts every case's name.
pub struct Pair<'a, C, R> {
    pub cand: &'a C,
    pub reference: &'a R,
    pub label: &'a str,
}

impl<C, R> Pair<'_, C, R> {
    /// [`check`] with the pair's label in front of the case.
    pub fn check(&self, op: &str, case: &str, cand: &[f32], reference: &[f32], tol: f64) {
        let case = match self.label {
            "" => case.to_string(),
            label => format!("{label} {case}"),
        };
        check(op, &case, cand, reference, tol)
    }
}

/// Runs `$body` with `$b` bound to the backend under test, then to the reference (the same
/// code, monomorphised for each), and returns both results.
macro_rules! both {
    ($g:expr, $c:expr, |$b:ident| $body:expr) => {{
        let g = {
            let $b = $g;
            $body
        };
        let c = {
            let $b = $c;
            $body
        };
        (g, c)
    }};
}

/// Writes one line straight to stderr (the test harness swallows `eprintln!`).
pub fn say(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

pub fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| scale * rng.next_f32()).collect()
}

pub fn read_all<B: Backend>(b: &B, buf: &B::Buf, len: usize) -> Vec<f32> {
    let mut out = vec![0.0; len];
    b.read(buf, 0, &mut out).unwrap();
    out
}

/// `len` NaNs on the device: an element the op should write and does not stays NaN.
pub fn poisoned<B: Backend>(b: &B, len: usize) -> B::Buf {
    b.upload(&vec![f32::NAN; len]).unwrap()
}

pub fn matrix<B: SparseOps>(
    b: &B,
    values: &[f32],
    dtype: DType,
    rows: usize,
    cols: usize,
) -> B::Matrix {
    let name = match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        q => panic!("the parity harness uploads float matrices, not {q}"),
    };
    b.upload_matrix(super::encode(values, name), dtype, rows, cols)
        .unwrap()
}

/// Compares whole buffers (NaN matches only NaN) and fails above `tol`: `cand` from the
/// backend under test, `reference` from the reference backend. Prints `PARITY <op> <case>
/// err=<e> tol=<t> ok|FAIL` (tools/gpu-check.sh collects these lines).
pub fn check(op: &str, case: &str, cand: &[f32], reference: &[f32], tol: f64) {
    assert_eq!(cand.len(), reference.len(), "{op} {case}: lengths");
    let scale = reference
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f64, |m, v| m.max(v.abs() as f64));
    let mut err = 0.0f64;
    for (i, (&g, &c)) in cand.iter().zip(reference).enumerate() {
        if g.is_nan() != c.is_nan() {
            say(&format!("PARITY {op} {case} err=inf tol={tol:e} FAIL"));
            panic!(
                "{op} {case}: element {i} is {g} on the backend under test, {c} on the reference \
                 (NaN = never written)"
            );
        }
        if !c.is_nan() {
            err = err.max((g as f64 - c as f64).abs() / scale);
        }
    }
    let verdict = if err <= tol { "ok" } else { "FAIL" };
    say(&format!(
        "PARITY {op} {case} err={err:.3e} tol={tol:e} {verdict}"
    ));
    assert!(err <= tol, "{op} {case}: error {err:e} above {tol:e}");
}

pub const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

// Thresholds (normalised error as above), one per kind of arithmetic:
/// Pure data movement and conversions (embed, copies, bias and residual adds: one rounding
/// per element in both backends, the same one).
pub const EXACT: f64 = 0.0;
/// Element-wise transcendental (SiLU) and rope: a few ulp apart at most (expf
/// implementations differ; rope uses the host's cos/sin and unfused products on both).
pub const ELEMENTWISE: f64 = 1e-6;
/// f32 reductions of one level (rmsnorm, Griffin scores): summation order differs, random
/// walk ~sqrt(n) * 6e-8 for n <= 4096, worst case n * 6e-8 = 2.5e-4 is never approached.
pub const REDUCE: f64 = 1e-5;
/// Attention: the output is a convex combination of values in [-1, 1]; the f32 softmax and
/// chunk merge differ in order (~1e-6). 5e-5 is still tight enough that one cache row too
/// many or too few (a shift of ~0.5 / rows >= 1.2e-4 at 4100 rows) fails.
pub const ATTENTION: f64 = 5e-5;
/// Weight x activation dot products accumulated in f32 (matvec kernels, neuron bundles, and
/// the f32 GEMM path: SGEMM on weights converted to f32, or f32 weights; cuBLAS's default
/// math mode uses no TF32): products of a rounded weight and an f32 activation are exact in
/// both, only the order of up to a few thousand f32 additions differs.
pub const DOT: f64 = 1e-4;
/// Whole-model logits after a prompt through the f32 GEMM path: the per-op f32 order
/// differences (each <= DOT) carried through the layers. 1e-2 leaves margin while a wrong
/// op is O(1).
pub const LOGITS: f64 = 1e-2;
/// Whole-model logits after a prompt through the bf16 GEMM path (the tiny 2-layer models of
/// gpu_end_to_end). Each GEMM is off by up to ~2 * 2^-8 of its largest output (see
/// [`gemm_tolerance`]: 8 sigma over a maximum near 4 sigma); a layer has 4 GEMM stages in
/// series (qkv, o, gate/up, down), so 2 layers and the head stack <= 9 such errors, which
/// add as a random walk: ~3 * 2 * 2^-8 = 2.3e-2, doubled for margin. Still far below the
/// O(1) of a wrong layout. A calibration, not a bound: written without a GPU to measure it.
pub const LOGITS_BF16: f64 = 5e-2;

/// The unit roundoff of the 16-bit type the bf16 GEMM path rounds activations to (the
/// weights' dtype): bf16 keeps 8 significant bits (2^-8), f16 11 (2^-11).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        DType::F32 => 0.0,
        q => panic!("unit_roundoff: {q} is not a float type"),
    }
}

/// The normalised tolerance (as [`check`] measures: error / max(1, max |cpu|)) of a GEMM
/// whose activations were rounded with unit roundoff `u`, weights `w` and activations `x`
/// (random, independent, zero-mean), contraction length `k`, against the CPU's `cpu`.
///
/// Each product w_j * x_j becomes w_j * x_j * (1 + d_j) with |d_j| <= u, so an output is off
/// by sum_j w_j x_j d_j: a sum of k independent zero-mean terms (the rounding errors of
/// different activations), of standard deviation <= u * sqrt(k) * rms(w) * rms(x). The
/// tolerance is 8 of those (the largest of ~10^5 outputs stays under ~4.5 sigma), plus DOT
/// for the f32 summation order. The outputs themselves are ~sqrt(k) * rms(w) * rms(x), so
/// this is ~2u of the largest output whatever k is: 7.8e-3 for bf16, 9.8e-4 for f16, while
/// a wrong row, column or transpose is O(1).
pub fn gemm_tolerance(u: f64, k: usize, w: &[f32], x: &[f32], cpu: &[f32]) -> f64 {
    let rms =
        |v: &[f32]| (v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    let scale = cpu
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f64, |m, v| m.max(v.abs() as f64));
    8.0 * u * (k as f64).sqrt() * rms(w) * rms(x) / scale + DOT
}

// ---------------------------------------------------------------- the ops

/// `embed`: every dtype, odd and wide rows; a token past the table is an error.
pub fn embed<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(1);
    for dtype in DTYPES {
        for cols in [64, 13, 576] {
            let rows = 37;
            let table = random(&mut rng, rows * cols, 1.0);
            let tokens = [0u32, 36, 5, 5, 17];
            let len = (tokens.len() + 2) * cols;
            let (go, co) = both!(g, c, |b| {
                let m = matrix(b, &table, dtype, rows, cols);
                let mut out = poisoned(b, len);
                b.embed(&m, &tokens, &mut out).unwrap();
                // A token past the table is an error, not a read out of bounds.
                assert!(b.embed(&m, &[rows as u32], &mut out).is_err());
                read_all(b, &out, len)
            });
            p.check(
                "embed",
                &format!("{dtype:?} {rows}x{cols}"),
                &go,
                &co,
                EXACT,
            );
        }
    }
}

/// `rmsnorm` over odd and wide rows, 1 to 16 of them.
pub fn rmsnorm<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(2);
    for h in [13, 64, 576, 4096] {
        for n in [1, 3, 16] {
            let x = random(&mut rng, (n + 1) * h, 2.0);
            let w: Vec<f32> = random(&mut rng, h, 0.2).iter().map(|v| 1.0 + v).collect();
            let (go, co) = both!(g, c, |b| {
                let (xb, wb) = (b.upload(&x).unwrap(), b.upload(&w).unwrap());
                let mut out = poisoned(b, (n + 1) * h);
                b.rmsnorm(&xb, &wb, 1e-5, n, &mut out).unwrap();
                read_all(b, &out, (n + 1) * h)
            });
            p.check("rmsnorm", &format!("h{h} n{n}"), &go, &co, REDUCE);
        }
    }
}

/// `silu_mul`, `silu`, `add` (with tails that must stay as they were) and `add_bias`.
pub fn elementwise<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(3);
    for len in [1, 13, 1000, 100_003] {
        // A tail past `len` that must stay as it was.
        let total = len + 5;
        let x = random(&mut rng, total, 8.0);
        let y = random(&mut rng, total, 8.0);
        let (go, co) = both!(g, c, |b| {
            let (mut xb, yb) = (b.upload(&x).unwrap(), b.upload(&y).unwrap());
            b.silu_mul(&mut xb, &yb, len).unwrap();
            read_all(b, &xb, total)
        });
        p.check("silu_mul", &format!("len{len}"), &go, &co, ELEMENTWISE);
        let (go, co) = both!(g, c, |b| {
            let mut xb = b.upload(&x).unwrap();
            b.silu(&mut xb, len).unwrap();
            read_all(b, &xb, total)
        });
        p.check("silu", &format!("len{len}"), &go, &co, ELEMENTWISE);
        let (go, co) = both!(g, c, |b| {
            let (mut xb, yb) = (b.upload(&x).unwrap(), b.upload(&y).unwrap());
            b.add(&mut xb, &yb, len).unwrap();
            read_all(b, &xb, total)
        });
        p.check("add", &format!("len{len}"), &go, &co, EXACT);
    }
    for (width, n) in [(64, 1), (13, 5), (576, 16)] {
        let x = random(&mut rng, (n + 2) * width, 1.0);
        let bias = random(&mut rng, width, 1.0);
        let (go, co) = both!(g, c, |b| {
            let (mut xb, bb) = (b.upload(&x).unwrap(), b.upload(&bias).unwrap());
            b.add_bias(&mut xb, &bb, n).unwrap();
            read_all(b, &xb, (n + 2) * width)
        });
        p.check("add_bias", &format!("w{width} n{n}"), &go, &co, EXACT);
    }
}

/// `copy_rows`, the KV cache's row ops on f32 and f16 buffers, `read` at offsets, `alloc` zeroed.
pub fn rows<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(4);
    for row_len in [13, 192, 576] {
        let rows = 12;
        let src = random(&mut rng, rows * row_len, 1.0);
        let (go, co) = both!(g, c, |b| {
            let s = b.upload(&src).unwrap();
            let mut d = poisoned(b, rows * row_len);
            b.copy_rows(&s, 2, &mut d, 4, 3, row_len).unwrap();
            b.copy_rows(&s, 11, &mut d, 0, 1, row_len).unwrap();
            assert!(b.copy_rows(&s, 10, &mut d, 0, 3, row_len).is_err());
            read_all(b, &d, rows * row_len)
        });
        p.check("copy_rows", &format!("row{row_len}"), &go, &co, EXACT);
        for dtype in [KvDType::F32, KvDType::F16] {
            kv_rows(p, &src, rows, row_len, dtype);
        }
    }
    // read: offsets, lengths, past the end; alloc is zeroed.
    let data = random(&mut rng, 1000, 1.0);
    for (offset, len) in [(0, 1000), (137, 13), (999, 1), (500, 0)] {
        let (go, co) = both!(g, c, |b| {
            let buf = b.upload(&data).unwrap();
            let mut out = vec![f32::NAN; len];
            b.read(&buf, offset, &mut out).unwrap();
            assert!(b.read(&buf, 990, &mut [0.0; 11]).is_err());
            out
        });
        p.check("read", &format!("@{offset} x{len}"), &go, &co, EXACT);
    }
    let zeros = read_all(g, &g.alloc(4099).unwrap(), 4099);
    p.check("alloc", "4099 zeroed", &zeros, &[0.0; 4099], EXACT);
}

/// The KV cache's row ops on `dtype` buffers: `store_kv` (rounding), `copy_kv_rows`,
/// `move_kv_rows` (overlapping, disjoint, in place, out of bounds), `read_kv`.
fn kv_rows<C: SparseOps, R: SparseOps>(
    p: &Pair<C, R>,
    src: &[f32],
    rows: usize,
    row_len: usize,
    dtype: KvDType,
) {
    let (g, c) = (p.cand, p.reference);
    let len = rows * row_len;
    let (go, co) = both!(g, c, |b| {
        let s = b.upload(src).unwrap();
        let mut kv = b.alloc_kv(len, dtype).unwrap();
        b.store_kv(&s, &mut kv, 2, 7, row_len).unwrap();
        assert!(b.store_kv(&s, &mut kv, 6, 7, row_len).is_err());
        let mut copy = b.alloc_kv(len, dtype).unwrap();
        b.copy_kv_rows(&kv, &mut copy, 9, row_len).unwrap();
        let mut out = vec![f32::NAN; len];
        b.read_kv(&copy, 0, &mut out).unwrap();
        assert!(b.read_kv(&copy, 1, &mut vec![0.0; len]).is_err());
        out
    });
    // Rows 0-1 and 9-11 stay zero; 2-8 hold src rows 0-6, rounded to the dtype.
    let want: Vec<f32> = (0..len)
        .map(|i| match i / row_len {
            2..=8 => round_to(dtype, src[i - 2 * row_len]),
            _ => 0.0,
        })
        .collect();
    p.check(
        "store_kv",
        &format!("{dtype} row{row_len}"),
        &go,
        &want,
        EXACT,
    );
    p.check(
        "copy_kv_rows",
        &format!("{dtype} row{row_len}"),
        &co,
        &want,
        EXACT,
    );
    // Overlapping, disjoint and in-place moves (a tree path compacted in the cache).
    for (src_row, dst_row, n) in [(3, 1, 5), (9, 0, 3), (4, 4, 2), (1, 0, 11)] {
        let (go, co) = both!(g, c, |b| {
            let s = b.upload(src).unwrap();
            let mut kv = b.alloc_kv(len, dtype).unwrap();
            b.store_kv(&s, &mut kv, 0, rows, row_len).unwrap();
            b.move_kv_rows(&mut kv, src_row, dst_row, n, row_len)
                .unwrap();
            assert!(b.move_kv_rows(&mut kv, 1, 2, 1, row_len).is_err());
            let mut out = vec![f32::NAN; len];
            b.read_kv(&kv, 0, &mut out).unwrap();
            out
        });
        let case = format!("{dtype} row{row_len} {src_row}->{dst_row} x{n}");
        p.check("move_kv_rows", &case, &go, &co, EXACT);
    }
}

/// `x` as a `dtype` KV cache stores it.
fn round_to(dtype: KvDType, x: f32) -> f32 {
    match dtype {
        KvDType::F32 => x,
        KvDType::F16 => half::f16::from_f32(x).to_f32(),
    }
}

/// `rope` at causal positions far into the table (plain and llama3 frequencies) and at tree depths.
pub fn rope<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(6);
    for (heads, hd, llama3) in [(9, 64, false), (4, 128, true), (3, 32, false)] {
        let table = rope_table(hd, llama3);
        let width = heads * hd;
        for start in [0, 7, 1000, 4090] {
            for n in [1, 3, 16] {
                let x = random(&mut rng, (n + 1) * width, 1.0);
                let (go, co) = both!(g, c, |b| {
                    let mut xb = b.upload(&x).unwrap();
                    let rows = Rows::Causal { start, len: n };
                    b.rope(&mut xb, heads, rows, &table).unwrap();
                    read_all(b, &xb, (n + 1) * width)
                });
                let case = format!("{heads}x{hd} llama3={llama3} @{start} n{n}");
                p.check("rope", &case, &go, &co, ELEMENTWISE);
            }
        }
        // Tree nodes sit at the positions of their depths: 3005, 3006, 3006, 3007, 3007.
        let parents = [None, Some(0), Some(0), Some(1), Some(2)];
        let mask = TreeMask::from_parents(3005, &parents, 0).unwrap();
        let x = random(&mut rng, (parents.len() + 1) * width, 1.0);
        let (go, co) = both!(g, c, |b| {
            let mut xb = b.upload(&x).unwrap();
            b.rope(&mut xb, heads, Rows::Tree(&mask), &table).unwrap();
            read_all(b, &xb, (parents.len() + 1) * width)
        });
        p.check("rope tree", &format!("{heads}x{hd}"), &go, &co, ELEMENTWISE);
    }
}

/// Causal `attention` for decode and windows, GQA shapes, positions up to 4k.
pub fn attention<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(7);
    for shape in SHAPES {
        let (qw, kvw) = (
            shape.num_heads * shape.head_dim,
            shape.num_kv_heads * shape.head_dim,
        );
        // Up to 4100 cache rows: several chunks of any plausible flash-decoding split.
        for start in [0, 5, 300, 1100, 4084] {
            for n in [1, 4, 16] {
                // Rows past start + n hold values the queries must not see.
                let cap = start + n + 3;
                let k = random(&mut rng, cap * kvw, 1.0);
                let v = random(&mut rng, cap * kvw, 1.0);
                let q = random(&mut rng, (n + 1) * qw, 1.0);
                let rows = Rows::Causal { start, len: n };
                for dtype in [KvDType::F32, KvDType::F16] {
                    let (go, co) =
                        both!(g, c, |b| attention_out(b, [&q, &k, &v], shape, rows, dtype));
                    let case = format!("{} {dtype} @{start} n{n}", shape_name(shape));
                    p.check("attention", &case, &go, &co, ATTENTION);
                }
            }
        }
    }
}

/// `attention` of `q` over the caches `k`, `v` on `b` into an output one token longer than the
/// batch, poisoned, so that a write past the batch shows.
fn attention_out<B: Backend>(
    b: &B,
    qkv: [&[f32]; 3],
    shape: AttentionShape,
    rows: Rows,
    dtype: KvDType,
) -> Vec<f32> {
    let q = b.upload(qkv[0]).unwrap();
    let [k, v] = [qkv[1], qkv[2]].map(|x| {
        let mut kv = b.alloc_kv(x.len(), dtype).unwrap();
        let row_len = shape.num_kv_heads * shape.head_dim;
        b.store_kv(
            &b.upload(x).unwrap(),
            &mut kv,
            0,
            x.len() / row_len,
            row_len,
        )
        .unwrap();
        kv
    });
    let len = (rows.len() + 1) * shape.num_heads * shape.head_dim;
    let mut out = poisoned(b, len);
    b.attention(&q, &k, &v, shape, rows, &mut out).unwrap();
    read_all(b, &out, len)
}

/// `attention` over token trees (siblings hidden from each other), several prefixes and batch starts.
pub fn tree_attention<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(8);
    // 0 -> {1, 2}; 1 -> {3, 5}; 2 -> 4; 3 -> 6: siblings hidden from each other.
    let parents = [None, Some(0), Some(0), Some(1), Some(2), Some(1), Some(3)];
    for shape in [SHAPES[0], SHAPES[1]] {
        let (qw, kvw) = (
            shape.num_heads * shape.head_dim,
            shape.num_kv_heads * shape.head_dim,
        );
        for prefix in [0, 9, 1500] {
            for batch_start in [0, 3] {
                let mask = TreeMask::from_parents(prefix, &parents, batch_start).unwrap();
                let n = mask.n_tokens();
                let cap = prefix + parents.len() + 2;
                let k = random(&mut rng, cap * kvw, 1.0);
                let v = random(&mut rng, cap * kvw, 1.0);
                let q = random(&mut rng, (n + 1) * qw, 1.0);
                let rows = Rows::Tree(&mask);
                let dtype = [KvDType::F32, KvDType::F16][batch_start % 2];
                let (go, co) = both!(g, c, |b| attention_out(b, [&q, &k, &v], shape, rows, dtype));
                let case = format!("{} prefix{prefix} from{batch_start}", shape_name(shape));
                p.check("tree_attention", &case, &go, &co, ATTENTION);
            }
        }
    }
}

/// `bundle_ffn` over every neuron (Griffin layout, with and without biases) and over per-token kept neurons (CATS layout).
pub fn bundle_ffn<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(9);
    for (h, f) in [(64, 96), (93, 200), (576, 1536)] {
        for dtype in DTYPES {
            for n in [1, 3, 16] {
                let x = random(&mut rng, (n + 1) * h, 1.0);
                let gud = random(&mut rng, f * 3 * h, 0.3);
                let ud = random(&mut rng, f * 2 * h, 0.3);
                let gate_bias = random(&mut rng, f, 0.1);
                let up_bias = random(&mut rng, f, 0.1);
                let coeff = random(&mut rng, (n + 1) * f, 1.0);
                let lists = random_lists(&mut rng, n, f);
                for biased in [false, true] {
                    let (go, co) = both!(g, c, |b| {
                        let m = matrix(b, &gud, dtype, f, 3 * h);
                        let (xb, gb, ub) = (
                            b.upload(&x).unwrap(),
                            b.upload(&gate_bias).unwrap(),
                            b.upload(&up_bias).unwrap(),
                        );
                        let sel = BundleSelection::All {
                            gate_bias: biased.then_some(&gb),
                            up_bias: biased.then_some(&ub),
                        };
                        let mut out = poisoned(b, (n + 1) * h);
                        let layout = BundleLayout::GateUpDown;
                        b.bundle_ffn(&m, layout, &xb, n, sel, &mut out).unwrap();
                        read_all(b, &out, (n + 1) * h)
                    });
                    let case = format!("All {dtype:?} h{h} f{f} n{n} bias={biased}");
                    p.check("bundle_ffn", &case, &go, &co, DOT);
                    let (go, co) = both!(g, c, |b| {
                        let m = matrix(b, &ud, dtype, f, 2 * h);
                        let (xb, cb, ub) = (
                            b.upload(&x).unwrap(),
                            b.upload(&coeff).unwrap(),
                            b.upload(&up_bias).unwrap(),
                        );
                        let sel = BundleSelection::PerToken {
                            coeff: &cb,
                            kept: &lists,
                            up_bias: biased.then_some(&ub),
                        };
                        let mut out = poisoned(b, (n + 1) * h);
                        let layout = BundleLayout::UpDown;
                        b.bundle_ffn(&m, layout, &xb, n, sel, &mut out).unwrap();
                        read_all(b, &out, (n + 1) * h)
                    });
                    let case = format!("PerToken {dtype:?} h{h} f{f} n{n} bias={biased}");
                    p.check("bundle_ffn", &case, &go, &co, DOT);
                }
            }
        }
    }
}

/// `gather_ffn`: a compact FFN of some neurons gathered from gate|up|down bundles.
pub fn gather_ffn<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(10);
    for dtype in DTYPES {
        for (h, f) in [(64, 96), (93, 200)] {
            let bundles = random(&mut rng, f * 3 * h, 1.0);
            let rows = [0u32, 5, 6, 7, 50, (f - 1) as u32];
            // The gathered matrices are read back row by row through `embed` (exact).
            let (go, co) = both!(g, c, |b| {
                let m = matrix(b, &bundles, dtype, f, 3 * h);
                let [gate, up, down] = b.gather_ffn(&m, &rows).unwrap();
                let k = rows.len();
                let mut all = Vec::new();
                for (mat, n_rows, width) in [(&gate, k, h), (&up, k, h), (&down, h, k)] {
                    let ids: Vec<u32> = (0..n_rows as u32).collect();
                    let mut out = poisoned(b, (n_rows + 1) * width);
                    b.embed(mat, &ids, &mut out).unwrap();
                    all.extend(read_all(b, &out, (n_rows + 1) * width));
                }
                assert!(b.gather_ffn(&m, &[f as u32]).is_err());
                all
            });
            p.check(
                "gather_ffn",
                &format!("{dtype:?} h{h} f{f}"),
                &go,
                &co,
                EXACT,
            );
        }
    }
}

/// `accumulate_neuron_scores` (Griffin) over rows with zero, small and large activations.
pub fn neuron_scores<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(11);
    for width in [96, 1536, 13] {
        for n in [1, 3, 40] {
            let mut z = random(&mut rng, (n + 1) * width, 3.0);
            // An all-zero row adds nothing.
            if n > 1 {
                z[width..2 * width].fill(0.0);
            }
            let acc: Vec<f32> = random(&mut rng, width + 3, 1.0)
                .iter()
                .map(|v| v.abs())
                .collect();
            let (go, co) = both!(g, c, |b| {
                let zb = b.upload(&z).unwrap();
                let mut ab = b.upload(&acc).unwrap();
                b.accumulate_neuron_scores(&zb, n, width, &mut ab).unwrap();
                read_all(b, &ab, width + 3)
            });
            let case = format!("w{width} n{n}");
            p.check("accumulate_neuron_scores", &case, &go, &co, REDUCE);
        }
    }
}

/// `select_neurons` by top-k and threshold, per token and shared over a batch.
pub fn neuron_selection<C: SparseOps, R: SparseOps>(p: &Pair<C, R>) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(12);
    for width in [96, 1536] {
        for n in [1, 3, 16] {
            let act = random(&mut rng, (n + 1) * width, 1.0);
            let rules = [
                NeuronRule::TopK(1),
                NeuronRule::TopK(width / 4),
                NeuronRule::TopK(width),
                NeuronRule::Threshold(0.5),
                NeuronRule::Threshold(0.0),
                NeuronRule::Threshold(2.0),
            ];
            for rule in rules {
                for shared in [false, true] {
                    let (go, co) = both!(g, c, |b| {
                        let mut ab = b.upload(&act).unwrap();
                        // Stale lists the op must overwrite.
                        let mut kept = NeuronLists {
                            ids: vec![7; 5],
                            offsets: vec![0, 2, 5],
                        };
                        b.select_neurons(&mut ab, n, width, rule, shared, &mut kept)
                            .unwrap();
                        (read_all(b, &ab, (n + 1) * width), kept)
                    });
                    let op = if shared {
                        "select_neurons_shared"
                    } else {
                        "select_neurons"
                    };
                    let case = format!("{rule:?} w{width} n{n}");
                    assert_eq!(go.1.offsets, co.1.offsets, "{op} {case}: list offsets");
                    assert_eq!(go.1.ids, co.1.ids, "{op} {case}: kept neurons");
                    p.check(op, &case, &go.0, &co.0, EXACT);
                }
            }
        }
    }
}

/// `matmul` for each of `batches` token counts: every dtype, odd and real shapes.
pub fn matmul<C: SparseOps, R: SparseOps>(p: &Pair<C, R>, batches: &[usize]) {
    let (g, c) = (p.cand, p.reference);
    let mut rng = Rng::new(5);
    for (rows, cols) in [(64, 64), (67, 93), (1536, 576), (576, 1536), (1000, 24)] {
        let w = random(&mut rng, rows * cols, 0.5);
        for dtype in DTYPES {
            for &n in batches {
                let x = random(&mut rng, (n + 1) * cols, 1.0);
                let go = matmul_on(g, &w, dtype, (rows, cols), &x, n);
                let co = matmul_on(c, &w, dtype, (rows, cols), &x, n);
                p.check(
                    "matmul",
                    &format!("{dtype:?} {rows}x{cols} n{n}"),
                    &go,
                    &co,
                    DOT,
                );
            }
        }
    }
}

// ---------------------------------------------------------------- case helpers

fn rope_table(head_dim: usize, llama3: bool) -> RopeTable {
    let spec = TinySpec {
        hidden: head_dim * 2,
        heads: 2,
        kv_heads: 2,
        max_pos: 8192,
        ..TinySpec::default()
    };
    let mut json = super::config_json(&spec);
    if llama3 {
        json["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024});
        json["rope_theta"] = 500000.0.into();
    }
    let config = ModelConfig::from_json(&json.to_string(), std::path::Path::new("rope")).unwrap();
    RopeTable::new(config.head_dim, rope_frequencies(&config))
}

const SHAPES: [AttentionShape; 4] = [
    AttentionShape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
    },
    AttentionShape {
        num_heads: 4,
        num_kv_heads: 4,
        head_dim: 128,
    },
    AttentionShape {
        num_heads: 8,
        num_kv_heads: 1,
        head_dim: 64,
    },
    AttentionShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 256,
    },
];

fn shape_name(s: AttentionShape) -> String {
    format!("{}/{}x{}", s.num_heads, s.num_kv_heads, s.head_dim)
}

/// Token t keeps a random subset of the neurons (one token keeps none, one keeps all).
fn random_lists(rng: &mut Rng, n: usize, neurons: usize) -> NeuronLists {
    let mut lists = NeuronLists::default();
    lists.clear();
    for t in 0..n {
        let p = [0.3, 0.0, 1.0][t % 3];
        lists.push_token((0..neurons as u32).filter(|_| (rng.next_f32() + 1.0) / 2.0 < p));
    }
    lists
}

/// `w · x[t]` for t < n on `b`, over an output poisoned one row past the n rows.
pub fn matmul_on<B: SparseOps>(
    b: &B,
    w: &[f32],
    dtype: DType,
    (rows, cols): (usize, usize),
    x: &[f32],
    n: usize,
) -> Vec<f32> {
    let m = matrix(b, w, dtype, rows, cols);
    let xb = b.upload(x).unwrap();
    let mut out = poisoned(b, (n + 1) * rows);
    b.matmul(&m, &xb, n, &mut out).unwrap();
    read_all(b, &out, (n + 1) * rows)
}
