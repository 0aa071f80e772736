//! CUDA backend parity (issue 6, item 5): every `Backend` op on the GPU against the CPU
//! reference on fresh random inputs of several shapes, then end to end (greedy tokens of tiny
//! random models and SmolLM2, Sirius invariants on the GPU), and the host-to-device bandwidth
//! that `tools/gpu-check.sh` reports.
//!
//! Every output buffer starts POISONED (NaN) on both backends, one row or more past what the
//! op should write, and whole buffers are compared with NaN matching only NaN: an element the
//! GPU failed to write, or wrote past its rows, fails. In-place ops get tails that must stay
//! as they were. The error of a comparison is `max |gpu - cpu| / max(1, max |cpu|)`; every
//! check prints `PARITY <op> <case> err=<e> tol=<t>` to stderr (gpu-check collects them).
//!
//! Without a GPU (no driver library, or device 0 does not open) each test prints
//! `SKIPPED (gpu parity): <why>` and passes; with `SIRIUS_REQUIRE_GPU=1` it fails instead.
#![cfg(feature = "cuda")]

mod common;

use std::io::Write;

use sirius_offload::backend::cuda::device;
use sirius_offload::backend::{
    AttentionShape, Backend, BundleLayout, BundleSelection, CpuBackend, NeuronLists, NeuronRule,
    RopeTable, TreeMask,
};
use sirius_offload::config::ModelConfig;
use sirius_offload::dtype::DType;
use sirius_offload::model::{sampler::argmax, Llama, Logits, Scratch};
use sirius_offload::sirius::{correct, correct_tree, CorrectorOptions, LlamaSirius};
use sirius_offload::sparsity::{Sparsity, SparsityMode};

use common::{Rng, TinySpec};

// ---------------------------------------------------------------- the backend under test

type Gpu = sirius_offload::backend::cuda::CudaBackend;

fn open_backend() -> sirius_offload::Result<Gpu> {
    Gpu::new(0)
}

/// Writes one line straight to stderr (the test harness swallows `eprintln!`).
fn say(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// The CUDA backend on device 0, or None after saying why the test is skipped. A machine
/// whose GPU opens but whose backend does not start (NVRTC, cuBLAS) fails: that is a bug or a
/// broken install, not a machine without a GPU.
fn gpu() -> Option<Gpu> {
    let why = if !device::driver_present() {
        device::NO_DRIVER.to_string()
    } else {
        match device::open(0) {
            Ok(_) => return Some(open_backend().expect("device 0 opens, the CUDA backend must")),
            Err(e) => e.to_string(),
        }
    };
    if std::env::var("SIRIUS_REQUIRE_GPU").as_deref() == Ok("1") {
        panic!("SIRIUS_REQUIRE_GPU=1 but no GPU: {why}");
    }
    say(&format!("SKIPPED (gpu parity): {why}"));
    None
}

fn cpu() -> CpuBackend {
    CpuBackend::new(2)
}

// ---------------------------------------------------------------- comparison helpers

fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| scale * rng.next_f32()).collect()
}

fn read_all<B: Backend>(b: &B, buf: &B::Buf, len: usize) -> Vec<f32> {
    let mut out = vec![0.0; len];
    b.read(buf, 0, &mut out).unwrap();
    out
}

/// `len` NaNs on the device: an element the op should write and does not stays NaN.
fn poisoned<B: Backend>(b: &B, len: usize) -> B::Buf {
    b.upload(&vec![f32::NAN; len]).unwrap()
}

fn matrix<B: Backend>(b: &B, values: &[f32], dtype: DType, rows: usize, cols: usize) -> B::Matrix {
    let name = match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    };
    b.upload_matrix(common::encode(values, name), dtype, rows, cols)
        .unwrap()
}

/// Compares whole buffers (NaN matches only NaN) and fails above `tol`.
fn check(op: &str, case: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{op} {case}: lengths");
    let scale = cpu
        .iter()
        .filter(|v| v.is_finite())
        .fold(1.0f64, |m, v| m.max(v.abs() as f64));
    let mut err = 0.0f64;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        if g.is_nan() != c.is_nan() {
            say(&format!("PARITY {op} {case} err=inf tol={tol:e} FAIL"));
            panic!(
                "{op} {case}: element {i} is {g} on the GPU, {c} on the CPU (NaN = never written)"
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

/// Runs `op` on both backends over buffers uploaded from the same host data and compares the
/// buffer at index `out` afterwards.
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

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

// Thresholds (normalised error as above), one per kind of arithmetic:
/// Pure data movement and conversions (embed, copies, bias and residual adds: one rounding
/// per element in both backends, the same one).
const EXACT: f64 = 0.0;
/// Element-wise transcendental (SiLU) and rope: a few ulp apart at most (expf
/// implementations differ; rope uses the host's cos/sin and unfused products on both).
const ELEMENTWISE: f64 = 1e-6;
/// f32 reductions of one level (rmsnorm, Griffin scores): summation order differs, random
/// walk ~sqrt(n) * 6e-8 for n <= 4096, worst case n * 6e-8 = 2.5e-4 is never approached.
const REDUCE: f64 = 1e-5;
/// Attention: the output is a convex combination of values in [-1, 1]; the f32 softmax and
/// chunk merge differ in order (~1e-6). 5e-5 is still tight enough that one cache row too
/// many or too few (a shift of ~0.5 / rows >= 1.2e-4 at 4100 rows) fails.
const ATTENTION: f64 = 5e-5;
/// Weight x activation dot products accumulated in f32 (matvec kernels, neuron bundles):
/// products of a rounded weight and an f32 activation are exact in both, only the order of
/// up to a few thousand f32 additions differs.
const DOT: f64 = 1e-4;
/// The GEMM path (cuBLAS, n_tokens > 16): activations may be rounded to the weight dtype
/// (bf16: 2^-9 relative per product) or TF32 may be used for f32; those errors random-walk
/// to ~2-3e-3 of the largest output. 1e-2 leaves margin while wrong indexing is O(1).
const GEMM: f64 = 1e-2;

// ---------------------------------------------------------------- element-wise, rows, read

#[test]
fn embed_matches() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng::new(1);
    for dtype in DTYPES {
        for cols in [64, 13, 576] {
            let rows = 37;
            let table = random(&mut rng, rows * cols, 1.0);
            let tokens = [0u32, 36, 5, 5, 17];
            let len = (tokens.len() + 2) * cols;
            let (go, co) = both!(&g, &c, |b| {
                let m = matrix(b, &table, dtype, rows, cols);
                let mut out = poisoned(b, len);
                b.embed(&m, &tokens, &mut out).unwrap();
                // A token past the table is an error, not a read out of bounds.
                assert!(b.embed(&m, &[rows as u32], &mut out).is_err());
                read_all(b, &out, len)
            });
            check(
                "embed",
                &format!("{dtype:?} {rows}x{cols}"),
                &go,
                &co,
                EXACT,
            );
        }
    }
}

#[test]
fn rmsnorm_matches() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng::new(2);
    for h in [13, 64, 576, 4096] {
        for n in [1, 3, 16] {
            let x = random(&mut rng, (n + 1) * h, 2.0);
            let w: Vec<f32> = random(&mut rng, h, 0.2).iter().map(|v| 1.0 + v).collect();
            let (go, co) = both!(&g, &c, |b| {
                let (xb, wb) = (b.upload(&x).unwrap(), b.upload(&w).unwrap());
                let mut out = poisoned(b, (n + 1) * h);
                b.rmsnorm(&xb, &wb, 1e-5, n, &mut out).unwrap();
                read_all(b, &out, (n + 1) * h)
            });
            check("rmsnorm", &format!("h{h} n{n}"), &go, &co, REDUCE);
        }
    }
}

#[test]
fn elementwise_ops_match() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng::new(3);
    for len in [1, 13, 1000, 100_003] {
        // A tail past `len` that must stay as it was.
        let total = len + 5;
        let x = random(&mut rng, total, 8.0);
        let y = random(&mut rng, total, 8.0);
        let (go, co) = both!(&g, &c, |b| {
            let (mut xb, yb) = (b.upload(&x).unwrap(), b.upload(&y).unwrap());
            b.silu_mul(&mut xb, &yb, len).unwrap();
            read_all(b, &xb, total)
        });
        check("silu_mul", &format!("len{len}"), &go, &co, ELEMENTWISE);
        let (go, co) = both!(&g, &c, |b| {
            let mut xb = b.upload(&x).unwrap();
            b.silu(&mut xb, len).unwrap();
            read_all(b, &xb, total)
        });
        check("silu", &format!("len{len}"), &go, &co, ELEMENTWISE);
        let (go, co) = both!(&g, &c, |b| {
            let (mut xb, yb) = (b.upload(&x).unwrap(), b.upload(&y).unwrap());
            b.add(&mut xb, &yb, len).unwrap();
            read_all(b, &xb, total)
        });
        check("add", &format!("len{len}"), &go, &co, EXACT);
    }
    for (width, n) in [(64, 1), (13, 5), (576, 16)] {
        let x = random(&mut rng, (n + 2) * width, 1.0);
        let bias = random(&mut rng, width, 1.0);
        let (go, co) = both!(&g, &c, |b| {
            let (mut xb, bb) = (b.upload(&x).unwrap(), b.upload(&bias).unwrap());
            b.add_bias(&mut xb, &bb, n).unwrap();
            read_all(b, &xb, (n + 2) * width)
        });
        check("add_bias", &format!("w{width} n{n}"), &go, &co, EXACT);
    }
}

#[test]
fn row_copies_and_reads_match() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng::new(4);
    for row_len in [13, 192, 576] {
        let rows = 12;
        let src = random(&mut rng, rows * row_len, 1.0);
        let (go, co) = both!(&g, &c, |b| {
            let s = b.upload(&src).unwrap();
            let mut d = poisoned(b, rows * row_len);
            b.copy_rows(&s, 2, &mut d, 4, 3, row_len).unwrap();
            b.copy_rows(&s, 11, &mut d, 0, 1, row_len).unwrap();
            assert!(b.copy_rows(&s, 10, &mut d, 0, 3, row_len).is_err());
            read_all(b, &d, rows * row_len)
        });
        check("copy_rows", &format!("row{row_len}"), &go, &co, EXACT);
        // Overlapping, disjoint and in-place moves (a tree path compacted in the cache).
        for (src_row, dst_row, n) in [(3, 1, 5), (9, 0, 3), (4, 4, 2), (1, 0, 11)] {
            let (go, co) = both!(&g, &c, |b| {
                let mut buf = b.upload(&src).unwrap();
                b.move_rows(&mut buf, src_row, dst_row, n, row_len).unwrap();
                assert!(b.move_rows(&mut buf, 1, 2, 1, row_len).is_err());
                read_all(b, &buf, rows * row_len)
            });
            let case = format!("row{row_len} {src_row}->{dst_row} x{n}");
            check("move_rows", &case, &go, &co, EXACT);
        }
    }
    // read: offsets, lengths, past the end; alloc is zeroed.
    let data = random(&mut rng, 1000, 1.0);
    for (offset, len) in [(0, 1000), (137, 13), (999, 1), (500, 0)] {
        let (go, co) = both!(&g, &c, |b| {
            let buf = b.upload(&data).unwrap();
            let mut out = vec![f32::NAN; len];
            b.read(&buf, offset, &mut out).unwrap();
            assert!(b.read(&buf, 990, &mut [0.0; 11]).is_err());
            out
        });
        check("read", &format!("@{offset} x{len}"), &go, &co, EXACT);
    }
    let zeros = read_all(&g, &g.alloc(4099).unwrap(), 4099);
    check("alloc", "4099 zeroed", &zeros, &[0.0; 4099], EXACT);
}

// ---------------------------------------------------------------- matmul

#[test]
fn matmul_matches_on_both_paths() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng::new(5);
    // Odd shapes take the element-by-element fallback; n 1 the matvec, 3 and 16 the small
    // kernel, 40 the GEMM.
    for (rows, cols) in [(64, 64), (67, 93), (1536, 576), (576, 1536), (1000, 24)] {
        let w = random(&mut rng, rows * cols, 0.5);
        for dtype in DTYPES {
            for n in [1, 3, 16, 40] {
                let x = random(&mut rng, (n + 1) * cols, 1.0);
                let (go, co) = both!(&g, &c, |b| {
                    let m = matrix(b, &w, dtype, rows, cols);
                    let xb = b.upload(&x).unwrap();
                    let mut out = poisoned(b, (n + 1) * rows);
                    b.matmul(&m, &xb, n, &mut out).unwrap();
                    read_all(b, &out, (n + 1) * rows)
                });
                let tol = if n > 16 { GEMM } else { DOT };
                let case = format!("{dtype:?} {rows}x{cols} n{n}");
                check("matmul", &case, &go, &co, tol);
            }
        }
    }
}

// ---------------------------------------------------------------- rope and attention

fn rope_table(head_dim: usize, llama3: bool) -> RopeTable {
    let spec = TinySpec {
        hidden: head_dim * 2,
        heads: 2,
        kv_heads: 2,
        max_pos: 8192,
        ..TinySpec::default()
    };
    let mut json = common::config_json(&spec);
    if llama3 {
        json["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024});
        json["rope_theta"] = 500000.0.into();
    }
    let config = ModelConfig::from_json(&json.to_string(), std::path::Path::new("rope")).unwrap();
    RopeTable::new(&config)
}

#[test]
fn rope_matches() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng::new(6);
    for (heads, hd, llama3) in [(9, 64, false), (4, 128, true), (3, 32, false)] {
        let table = rope_table(hd, llama3);
        let width = heads * hd;
        for start in [0, 7, 1000, 4090] {
            for n in [1, 3, 16] {
                let x = random(&mut rng, (n + 1) * width, 1.0);
                let (go, co) = both!(&g, &c, |b| {
                    let mut xb = b.upload(&x).unwrap();
                    b.rope(&mut xb, heads, start, n, &table).unwrap();
                    read_all(b, &xb, (n + 1) * width)
                });
                let case = format!("{heads}x{hd} llama3={llama3} @{start} n{n}");
                check("rope", &case, &go, &co, ELEMENTWISE);
            }
        }
        let positions = [5, 6, 6, 7, 7, 100, 3000];
        let x = random(&mut rng, (positions.len() + 1) * width, 1.0);
        let (go, co) = both!(&g, &c, |b| {
            let mut xb = b.upload(&x).unwrap();
            b.rope_at(&mut xb, heads, &positions, &table).unwrap();
            read_all(b, &xb, (positions.len() + 1) * width)
        });
        check("rope_at", &format!("{heads}x{hd}"), &go, &co, ELEMENTWISE);
    }
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

#[test]
fn attention_matches_for_decode_and_windows() {
    let Some(g) = gpu() else { return };
    let c = cpu();
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
                let (go, co) = both!(&g, &c, |b| {
                    let (qb, kb, vb) = (
                        b.upload(&q).unwrap(),
                        b.upload(&k).unwrap(),
                        b.upload(&v).unwrap(),
                    );
                    let mut out = poisoned(b, (n + 1) * qw);
                    b.attention(&qb, &kb, &vb, shape, start, n, &mut out)
                        .unwrap();
                    read_all(b, &out, (n + 1) * qw)
                });
                let case = format!("{} @{start} n{n}", shape_name(shape));
                check("attention", &case, &go, &co, ATTENTION);
            }
        }
    }
}

#[test]
fn tree_attention_matches() {
    let Some(g) = gpu() else { return };
    let c = cpu();
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
                let (go, co) = both!(&g, &c, |b| {
                    let (qb, kb, vb) = (
                        b.upload(&q).unwrap(),
                        b.upload(&k).unwrap(),
                        b.upload(&v).unwrap(),
                    );
                    let mut out = poisoned(b, (n + 1) * qw);
                    b.tree_attention(&qb, &kb, &vb, shape, &mask, &mut out)
                        .unwrap();
                    read_all(b, &out, (n + 1) * qw)
                });
                let case = format!("{} prefix{prefix} from{batch_start}", shape_name(shape));
                check("tree_attention", &case, &go, &co, ATTENTION);
            }
        }
    }
}

// ---------------------------------------------------------------- contextual sparsity ops

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

#[test]
fn bundle_ffn_matches() {
    let Some(g) = gpu() else { return };
    let c = cpu();
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
                    let (go, co) = both!(&g, &c, |b| {
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
                    check("bundle_ffn", &case, &go, &co, DOT);
                    let (go, co) = both!(&g, &c, |b| {
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
                    check("bundle_ffn", &case, &go, &co, DOT);
                }
            }
        }
    }
}

#[test]
fn gather_ffn_matches() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng::new(10);
    for dtype in DTYPES {
        for (h, f) in [(64, 96), (93, 200)] {
            let bundles = random(&mut rng, f * 3 * h, 1.0);
            let rows = [0u32, 5, 6, 7, 50, (f - 1) as u32];
            // The gathered matrices are read back row by row through `embed` (exact).
            let (go, co) = both!(&g, &c, |b| {
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
            check(
                "gather_ffn",
                &format!("{dtype:?} h{h} f{f}"),
                &go,
                &co,
                EXACT,
            );
        }
    }
}

#[test]
fn neuron_scores_match() {
    let Some(g) = gpu() else { return };
    let c = cpu();
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
            let (go, co) = both!(&g, &c, |b| {
                let zb = b.upload(&z).unwrap();
                let mut ab = b.upload(&acc).unwrap();
                b.accumulate_neuron_scores(&zb, n, width, &mut ab).unwrap();
                read_all(b, &ab, width + 3)
            });
            let case = format!("w{width} n{n}");
            check("accumulate_neuron_scores", &case, &go, &co, REDUCE);
        }
    }
}

#[test]
fn neuron_selection_matches() {
    let Some(g) = gpu() else { return };
    let c = cpu();
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
                    let (go, co) = both!(&g, &c, |b| {
                        let mut ab = b.upload(&act).unwrap();
                        // Stale lists the op must overwrite.
                        let mut kept = NeuronLists {
                            ids: vec![7; 5],
                            offsets: vec![0, 2, 5],
                        };
                        if shared {
                            b.select_neurons_shared(&mut ab, n, width, rule, &mut kept)
                        } else {
                            b.select_neurons(&mut ab, n, width, rule, &mut kept)
                        }
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
                    check(op, &case, &go.0, &co.0, EXACT);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- end to end

fn greedy<B: Backend>(model: &Llama<B>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut cache = model.new_cache(prompt.len() + n).unwrap();
    let mut scratch = Scratch::new(model, prompt.len()).unwrap();
    let mut logits = model
        .forward(prompt, &mut cache, &mut scratch, Logits::Last)
        .unwrap();
    let first = logits.clone();
    let mut out = Vec::new();
    while out.len() < n {
        let t = argmax(&logits);
        out.push(t);
        logits = model
            .forward(&[t], &mut cache, &mut scratch, Logits::Last)
            .unwrap();
    }
    (out, first)
}

/// Greedy tokens of the model in `dir` on both backends; the prompt's logits are compared
/// too (GEMM tolerance: a long prompt runs through the GEMM path).
fn same_greedy(dir: &std::path::Path, prompt: &[u32], n: usize, label: &str) {
    // gpu() already said the device works: a second backend opens the same way.
    let g = Llama::load(dir, open_backend().unwrap()).unwrap();
    let c = Llama::load(dir, CpuBackend::new(4)).unwrap();
    let (gt, gl) = greedy(&g, prompt, n);
    let (ct, cl) = greedy(&c, prompt, n);
    check("prompt_logits", label, &gl, &cl, GEMM);
    let same = gt.iter().zip(&ct).take_while(|(a, b)| a == b).count();
    let verdict = if gt == ct { "ok" } else { "FAIL" };
    say(&format!(
        "PARITY greedy_tokens {label} same={same}/{n} {verdict}"
    ));
    assert_eq!(gt, ct, "{label}: greedy tokens differ from token {same}");
}

fn tiny_specs() -> Vec<(&'static str, TinySpec)> {
    let base = TinySpec {
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        ffn: 96,
        vocab: 128,
        max_pos: 128,
        ..TinySpec::default()
    };
    vec![
        ("llama-bf16-tied-gqa", base.clone()),
        (
            "llama-f16-untied",
            TinySpec {
                dtype: "F16",
                tied: false,
                kv_heads: 4,
                ..base.clone()
            },
        ),
        (
            "qwen2-f32-bias",
            TinySpec {
                arch: "Qwen2ForCausalLM",
                dtype: "F32",
                qkv_bias: true,
                ..base
            },
        ),
    ]
}

fn prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..len)
        .map(|_| 3 + ((rng.next_f32() + 1.0) / 2.0 * (vocab - 4) as f32) as u32)
        .collect()
}

#[test]
fn tiny_models_decode_the_same_tokens() {
    if gpu().is_none() {
        return;
    }
    for (label, spec) in tiny_specs() {
        let dir = tempfile::tempdir().unwrap();
        let model = common::write_model(dir.path(), &spec, 21);
        // 40 prompt tokens in one forward: the GEMM path; then decode steps: the matvec.
        same_greedy(&model, &prompt(40, spec.vocab, 5), 24, label);
    }
}

/// `SIRIUS_GPU_MODEL_DIR` (a real model gpu-check was given) or the fetched SmolLM2.
#[test]
fn a_real_model_decodes_the_same_tokens() {
    if gpu().is_none() {
        return;
    }
    let dir = match std::env::var_os("SIRIUS_GPU_MODEL_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => match common::smollm2_dir("gpu parity") {
            Some(d) => d,
            None => return,
        },
    };
    // "The capital of France is" style prompts from the SmolLM2 fixture.
    for (i, p) in [
        &[504u32, 808, 3772, 9552, 2966, 359][..],
        &[33580, 14870, 314, 260, 980, 411, 527],
    ]
    .iter()
    .enumerate()
    {
        same_greedy(&dir, p, 24, &format!("{} prompt{i}", dir.display()));
    }
}

/// SIRIUS.md's invariants on the GPU: keep 1.0 through the chain, and a threshold no draft
/// reaches (chain and tree), both give exactly the full model's greedy tokens.
#[test]
fn sirius_invariants_hold_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, spec) = tiny_specs().remove(0);
    let path = common::write_model(dir.path(), &spec, 22);
    let model = Llama::load(&path, g).unwrap();
    let p = prompt(8, spec.vocab, 6);
    let n = 24;
    let (want, _) = greedy(&model, &p, n);
    for mode in [SparsityMode::Griffin, SparsityMode::Cats] {
        let runs = [(1.0, 1, 0.1), (0.25, 1, 1.5), (0.25, 3, 1.5)];
        for (keep, width, threshold) in runs {
            let sparsity = Sparsity::new(&model, mode, keep, None).unwrap();
            let o = CorrectorOptions {
                period: 6,
                threshold,
                accept_temperature: 0.6,
                width,
                max_tokens: n,
            };
            let rows = p.len() + n + 1 + (o.period - 1) * (o.width - 1);
            let mut m = LlamaSirius::new(&model, &sparsity, rows, o.period, o.width).unwrap();
            let first = m.prefill(&p, 4, false).unwrap();
            let (out, stats) = if width > 1 {
                correct_tree(&mut m, first, &[], &o).unwrap()
            } else {
                correct(&mut m, first, &[], &o).unwrap()
            };
            let label = format!("{mode} keep {keep} W {width} thr {threshold}");
            let verdict = if out == want { "ok" } else { "FAIL" };
            say(&format!(
                "PARITY sirius {label} aal={:.2} {verdict}",
                stats.aal()
            ));
            assert_eq!(out, want, "{label}: not the full model's greedy tokens");
            let aal = if keep == 1.0 { 6.0 } else { 1.0 };
            assert_eq!(stats.aal(), aal, "{label}: average advance");
        }
    }
}

// ---------------------------------------------------------------- host-to-device bandwidth

/// Pinned vs pageable host-to-device copy rate (not a parity check: gpu-check reports the
/// `BANDWIDTH` line). 256 MiB per copy, best of 5 after a warm-up.
#[test]
fn host_to_device_bandwidth() {
    if gpu().is_none() {
        return;
    }
    use sirius_offload::backend::cuda::memory::{DeviceArena, HostAccess, PinnedBuffer, Stream};
    use std::sync::Arc;
    const BYTES: usize = 256 << 20;
    let dev = Arc::new(device::open(0).unwrap());
    let mut arena = DeviceArena::new(dev.clone(), BYTES as u64).unwrap();
    let dst = arena.alloc("bandwidth", BYTES as u64).unwrap();
    let stream = Stream::new(&dev).unwrap();
    let mut pinned = PinnedBuffer::new(&dev, BYTES, HostAccess::Upload).unwrap();
    pinned.as_mut_slice().fill(1);
    let pageable = vec![1u8; BYTES];
    let rate = |src: &[u8]| -> f64 {
        let mut best = 0.0f64;
        for i in 0..6 {
            dev.bind().unwrap();
            let t = std::time::Instant::now();
            // SAFETY: `dst` holds BYTES device bytes; `src` outlives the synchronised copy.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(dst.ptr(), src, stream.raw()).unwrap()
            };
            stream.synchronize().unwrap();
            let gbps = BYTES as f64 / t.elapsed().as_secs_f64() / 1e9;
            if i > 0 {
                best = best.max(gbps);
            }
        }
        best
    };
    let (p, q) = (rate(pinned.as_slice()), rate(&pageable));
    say(&format!(
        "BANDWIDTH pinned_gbps={p:.2} pageable_gbps={q:.2} bytes={BYTES} device={}",
        dev.describe()
    ));
    assert!(p > 0.0 && q > 0.0);
    arena.free(dst).unwrap();
}
