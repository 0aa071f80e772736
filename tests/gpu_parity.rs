//! CUDA backend parity: every backend op on the GPU against the CPU reference, through the
//! per-op harness the CPU's SIMD tiers also run (`common::parity`: the table of shapes,
//! dtypes and tolerances, poisoned outputs), plus what only the GPU has (the two cuBLAS
//! GEMM precisions, device errors) and the host-to-device bandwidth that
//! `tools/gpu-check.sh` reports.
//!
//! Without a GPU (no driver library, or device 0 does not open) each test prints
//! `SKIPPED (gpu parity): <why>` and passes; with `SIRIUS_REQUIRE_GPU=1` it fails instead.
#![cfg(feature = "cuda")]

mod common;

use sirius_offload::backend::cuda::device;
use sirius_offload::backend::Backend;

use common::gpu::*;
use common::parity::{self, Pair};
use common::Rng;

/// Every op of the parity table, CUDA against the CPU; matmul up to 16 tokens (the matvec
/// kernels: more is the GEMM test's).
#[test]
fn ops_match() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair {
        cand: &g,
        reference: &c,
        label: "",
    };
    parity::embed(&p);
    parity::rmsnorm(&p);
    parity::elementwise(&p);
    parity::rows(&p);
    parity::matmul(&p, &[1, 3, 16]);
    parity::rope(&p);
    parity::attention(&p);
    parity::tree_attention(&p);
    parity::bundle_ffn(&p);
    parity::gather_ffn(&p);
    parity::neuron_scores(&p);
    parity::neuron_selection(&p);
}

/// Batches over 16 tokens run cuBLAS, on both GEMM precisions (up to 16, the matvec kernels,
/// are in `ops_match` with the other ops). The
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
            for n in [17, 40, 128] {
                let x = random(&mut rng, (n + 1) * cols, 1.0);
                let co = matmul_on(&c, &w, dtype, (rows, cols), &x, n);
                let case = format!("{dtype:?} {rows}x{cols} n{n}");
                let go = matmul_on(&g, &w, dtype, (rows, cols), &x, n);
                let u = unit_roundoff(dtype);
                let tol = gemm_tolerance(u, cols, &w, &x[..n * cols], &co[..n * rows]);
                check("matmul_gemm_bf16", &case, &go, &co, tol);
                let go = matmul_on(&g32, &w, dtype, (rows, cols), &x, n);
                check("matmul_gemm_f32", &case, &go, &co, DOT);
            }
        }
    }
}

/// The device argmax the greedy path uses (`Backend::argmax_rows`) picks exactly what
/// `model::sampler::argmax` picks: ties (the lower index), NaN (never), rows of -inf or NaN
/// only (0), over vocabularies up to Llama 3's, a poisoned row past the batch left unread.
#[test]
fn argmax_rows_match() {
    use sirius_offload::model::sampler::argmax;
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng::new(17);
    for (vocab, n) in [(1, 1), (100, 5), (49_152, 16), (128_256, 2)] {
        let mut logits = random(&mut rng, n * vocab, 12.0);
        if n >= 5 {
            // Row 0: a tie for the maximum at both ends of the block's strides and a NaN.
            (logits[5], logits[vocab - 1], logits[7]) = (1e3, 1e3, f32::NAN);
            // Rows 1 and 2: nothing above -inf (argmax 0).
            logits[vocab..2 * vocab].fill(f32::NEG_INFINITY);
            logits[2 * vocab..3 * vocab].fill(f32::NAN);
            // Row 3: +inf twice; row 4: one finite value among -inf.
            (logits[3 * vocab + 9], logits[3 * vocab + 2]) = (f32::INFINITY, f32::INFINITY);
            logits[4 * vocab..5 * vocab].fill(f32::NEG_INFINITY);
            logits[5 * vocab - 3] = -1e30;
        }
        let mut padded = logits.clone();
        padded.extend(std::iter::repeat_n(f32::NAN, vocab));
        let want: Vec<u32> = logits.chunks_exact(vocab).map(argmax).collect();
        let got = g
            .argmax_rows(&g.upload(&padded).unwrap(), n, vocab)
            .unwrap();
        assert_eq!(got, want, "cuda argmax_rows vocab {vocab} n {n}");
        let host = c
            .argmax_rows(&c.upload(&padded).unwrap(), n, vocab)
            .unwrap();
        assert_eq!(host, want, "cpu argmax_rows vocab {vocab} n {n}");
        say(&format!("PARITY argmax_rows v{vocab} n{n} err=0 tol=0"));
    }
    let buf = g.upload(&[0.0; 8]).unwrap();
    assert!(g.argmax_rows(&buf, 3, 4).is_err(), "rows past the buffer");
}

#[test]
fn row_verdicts_match() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut rng = Rng::new(29);
    for (vocab, n, temperature) in [
        (1, 1, 1.0),
        (100, 6, 0.6),
        (49_152, 16, 0.6),
        (128_256, 3, 1.0),
    ] {
        let mut logits = random(&mut rng, n * vocab, 12.0);
        if n >= 6 {
            // Rows 1-3: nothing above -inf, all NaN, +inf (probability 0 for each).
            logits[vocab..2 * vocab].fill(f32::NEG_INFINITY);
            logits[2 * vocab..3 * vocab].fill(f32::NAN);
            logits[3 * vocab + 4] = f32::INFINITY;
            // Row 4: a NaN on the asked token; row 5: one dominant logit.
            logits[4 * vocab + 2] = f32::NAN;
            logits[5 * vocab + 7] = 40.0;
        }
        // The token after each row (the last row has none); one past the vocab in row 0.
        let mut next: Vec<u32> = (0..n.saturating_sub(1))
            .map(|i| (7 * i as u32 + 2) % vocab as u32)
            .collect();
        if let Some(first) = next.first_mut() {
            *first = vocab as u32;
        }
        if n >= 6 {
            next[4] = 2;
        }
        let host = c
            .row_verdicts(&c.upload(&logits).unwrap(), n, vocab, &next, temperature)
            .unwrap();
        let got = g
            .row_verdicts(&g.upload(&logits).unwrap(), n, vocab, &next, temperature)
            .unwrap();
        let mut worst = 0f64;
        for (r, (h, d)) in host.iter().zip(&got).enumerate() {
            assert_eq!(h.argmax, d.argmax, "argmax row {r} vocab {vocab}");
            match (h.probability, d.probability) {
                (Some(a), Some(b)) => worst = worst.max((a - b).abs()),
                (a, b) => assert_eq!(a, b, "row {r} vocab {vocab}"),
            }
        }
        assert!(
            worst < 1e-9,
            "vocab {vocab}: probabilities differ by {worst}"
        );
        say(&format!(
            "PARITY row_verdicts v{vocab} n{n} err={worst:.1e} tol=1e-9"
        ));
    }
}

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

/// The GGUF block formats on the GPU (kernels/quant.cu), on random blocks: products against
/// the CPU's de-quantized weights summed in f64 (the GPU keeps f32 activations, so only the
/// f32 summation order differs: DOT), for a decode token, a window and a batch past 16
/// (quantized batches stay on the small kernels); embedding rows bit-equal to the CPU's
/// de-quantization.
#[test]
fn quantized_products_and_rows_match() {
    use sirius_offload::backend::SparseOps;
    use sirius_offload::tensor::{quant::dequantize, DType};
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(9);
    for dtype in [
        DType::Q4_0,
        DType::Q4_1,
        DType::Q8_0,
        DType::Q4K,
        DType::Q6K,
    ] {
        for (rows, cols) in [(24, 256), (37, 512), (1536, 1536)] {
            let bytes = random_blocks(&mut rng, dtype, rows * cols / dtype.block().0);
            let mut w = vec![0f32; rows * cols];
            assert!(dequantize(dtype, &bytes, &mut w));
            let m = g.upload_matrix(bytes, dtype, rows, cols).unwrap();
            for n in [1, 3, 20] {
                let x = random(&mut rng, n * cols, 1.0);
                let mut out = g.alloc(n * rows).unwrap();
                g.matmul(&m, &g.upload(&x).unwrap(), n, &mut out).unwrap();
                let mut got = vec![f32::NAN; n * rows];
                g.read(&out, 0, &mut got).unwrap();
                let want: Vec<f32> = (0..n * rows)
                    .map(|i| {
                        let (t, r) = (i / rows, i % rows);
                        let (wr, xt) = (&w[r * cols..][..cols], &x[t * cols..][..cols]);
                        wr.iter()
                            .zip(xt)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>() as f32
                    })
                    .collect();
                check(
                    "matmul_quantized",
                    &format!("{dtype} {rows}x{cols} n{n}"),
                    &got,
                    &want,
                    DOT,
                );
            }
            let tokens = [0, rows as u32 - 1, rows as u32 / 2];
            let mut out = g.alloc(tokens.len() * cols).unwrap();
            g.embed(&m, &tokens, &mut out).unwrap();
            let mut got = vec![f32::NAN; tokens.len() * cols];
            g.read(&out, 0, &mut got).unwrap();
            let want: Vec<f32> = tokens
                .iter()
                .flat_map(|&id| w[id as usize * cols..][..cols].to_vec())
                .collect();
            check(
                "embed_quantized",
                &format!("{dtype} {rows}x{cols}"),
                &got,
                &want,
                0.0,
            );
        }
    }
}

/// Random blocks of `dtype` whose f16 scales are small and finite (random bytes there could
/// be infinities or NaN).
fn random_blocks(rng: &mut Rng, dtype: sirius_offload::tensor::DType, n: usize) -> Vec<u8> {
    use sirius_offload::tensor::DType;
    let (_, bytes) = dtype.block();
    let scales: &[usize] = match dtype {
        DType::Q4_1 | DType::Q4K => &[0, 2],
        DType::Q6K => &[208],
        _ => &[0],
    };
    let mut out: Vec<u8> = (0..n * bytes)
        .map(|_| (rng.next_f32() * 256.0) as u8)
        .collect();
    for block in out.chunks_exact_mut(bytes) {
        for &at in scales {
            let h = half::f16::from_f32(0.002 + 0.01 * rng.next_f32());
            block[at..at + 2].copy_from_slice(&h.to_bits().to_le_bytes());
        }
    }
    out
}
