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

use sirius_offload::backend::cuda::device;
use sirius_offload::backend::{
    AttentionShape, Backend, BundleLayout, BundleSelection, NeuronLists, NeuronRule, RopeTable,
    Rows, SparseOps,
};
use sirius_offload::config::ModelConfig;
use sirius_offload::model::rope::rope_frequencies;
use sirius_offload::tensor::DType;
use sirius_offload::tensor::TreeMask;

use common::gpu::*;
use common::{Rng, TinySpec};

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

/// `w · x[t]` for t < n on `b`, over an output poisoned one row past the n rows.
fn matmul_on<B: SparseOps>(
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

/// Up to 16 tokens: the matvec kernels (DOT). Over 16: cuBLAS, on both GEMM precisions. The
/// bf16 path rounds the activations to the weights' 16-bit dtype, so its tolerance scales
/// with that dtype's unit roundoff ([`gemm_tolerance`]); the f32 path (SGEMM on converted
/// weights) and f32 weights (SGEMM on either path) only reorder f32 sums (DOT).
#[test]
fn matmul_matches_on_both_paths() {
    let Some(g) = gpu_with(GemmPrecision::Bf16) else {
        return;
    };
    // gpu_with() already said the device works: a second backend opens the same way.
    let g32 = open_backend_with(GemmPrecision::F32).unwrap();
    assert_eq!(
        (g.gemm_precision(), g32.gemm_precision()),
        (GemmPrecision::Bf16, GemmPrecision::F32)
    );
    if !g.has_cublas() {
        say("matmul: no libcublas, batches over 16 tokens run on the small-batch kernel");
    }
    let c = cpu();
    let mut rng = Rng::new(5);
    // Odd shapes take the element-by-element fallback (and odd leading dimensions in cuBLAS);
    // n 1 the matvec, 3 and 16 the small kernel, 17 (the first GEMM batch), 40 and 128 the
    // GEMM.
    for (rows, cols) in [(64, 64), (67, 93), (1536, 576), (576, 1536), (1000, 24)] {
        let w = random(&mut rng, rows * cols, 0.5);
        for dtype in DTYPES {
            for n in [1, 3, 16, 17, 40, 128] {
                let x = random(&mut rng, (n + 1) * cols, 1.0);
                let co = matmul_on(&c, &w, dtype, (rows, cols), &x, n);
                let case = format!("{dtype:?} {rows}x{cols} n{n}");
                let go = matmul_on(&g, &w, dtype, (rows, cols), &x, n);
                if n <= 16 {
                    check("matmul", &case, &go, &co, DOT);
                    continue;
                }
                let u = unit_roundoff(dtype);
                let tol = gemm_tolerance(u, cols, &w, &x[..n * cols], &co[..n * rows]);
                check("matmul_gemm_bf16", &case, &go, &co, tol);
                let go = matmul_on(&g32, &w, dtype, (rows, cols), &x, n);
                check("matmul_gemm_f32", &case, &go, &co, DOT);
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
    RopeTable::new(config.head_dim, rope_frequencies(&config))
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
                    let rows = Rows::Causal { start, len: n };
                    b.rope(&mut xb, heads, rows, &table).unwrap();
                    read_all(b, &xb, (n + 1) * width)
                });
                let case = format!("{heads}x{hd} llama3={llama3} @{start} n{n}");
                check("rope", &case, &go, &co, ELEMENTWISE);
            }
        }
        // Tree nodes sit at the positions of their depths: 3005, 3006, 3006, 3007, 3007.
        let parents = [None, Some(0), Some(0), Some(1), Some(2)];
        let mask = TreeMask::from_parents(3005, &parents, 0).unwrap();
        let x = random(&mut rng, (parents.len() + 1) * width, 1.0);
        let (go, co) = both!(&g, &c, |b| {
            let mut xb = b.upload(&x).unwrap();
            b.rope(&mut xb, heads, Rows::Tree(&mask), &table).unwrap();
            read_all(b, &xb, (parents.len() + 1) * width)
        });
        check("rope tree", &format!("{heads}x{hd}"), &go, &co, ELEMENTWISE);
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
                    let rows = Rows::Causal { start, len: n };
                    b.attention(&qb, &kb, &vb, shape, rows, &mut out).unwrap();
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
                    let rows = Rows::Tree(&mask);
                    b.attention(&qb, &kb, &vb, shape, rows, &mut out).unwrap();
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
                    check(op, &case, &go.0, &co.0, EXACT);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- end to end

// ---------------------------------------------------------------- host-to-device bandwidth

/// Pinned vs pageable host-to-device copy rate (not a parity check: gpu-check reports the
/// `BANDWIDTH` line). 256 MiB per copy, best of 5 after a warm-up.
#[test]
fn host_to_device_bandwidth() {
    let Some(g) = gpu() else { return };
    use sirius_offload::backend::cuda::memory::{HostAccess, PinnedBuffer, Stream};
    use std::sync::Arc;
    const BYTES: usize = 256 << 20;
    // The same device (its primary context) as the backend's, whose memory is the target.
    let dev = Arc::new(device::open(0).unwrap());
    let dst = g.alloc(BYTES / 4).unwrap();
    // Allocated in the backend's stream order: done before another stream writes it.
    g.synchronize().unwrap();
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
                cudarc::driver::result::memcpy_htod_async(dst.device_ptr(), src, stream.raw())
                    .unwrap()
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
}
