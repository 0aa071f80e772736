//! `--weights q8_0|q4_0|bf16|...` on a float checkpoint: every matrix is converted at load
//! (vectors stay as stored), each value within its format's rounding of the original, and the
//! quantized model tracks the float one (tiny fixtures; SmolLM2-135M where fetched).

mod common;

use sirius_offload::backend::CpuBackend;
use sirius_offload::model::{Llama, Logits, ModelFiles, Pass, Scratch, WeightsChoice};
use sirius_offload::sparsity::Dense;
use sirius_offload::tensor::quant::dequantize;
use sirius_offload::tensor::DType;

fn values(t: &sirius_offload::tensor::TensorRef) -> Vec<f32> {
    let mut out = vec![0f32; t.shape.iter().product()];
    assert!(dequantize(t.dtype, t.bytes(), &mut out), "{}", t.name);
    out
}

/// Every 2-D tensor becomes `to`, within half a step (plus the f16 scale's rounding) of the
/// stored value per block of 32; vectors keep their stored type and bytes.
#[test]
fn every_matrix_is_converted_within_its_rounding() {
    for fixture in ["llama-tied-gqa-bf16", "llama-untied-f32", "qwen2-bias-f16"] {
        let dir = common::fixtures_dir().join("tiny").join(fixture);
        let (_, stored) = ModelFiles::open_model(&dir, WeightsChoice::AsStored).unwrap();
        for (to, levels) in [(DType::Q8_0, 127.0), (DType::Q4_0, 8.0), (DType::BF16, 0.0)] {
            let (_, conv) = ModelFiles::open_model(&dir, WeightsChoice::Convert(to)).unwrap();
            for (name, shape) in stored.shapes() {
                let a = stored.get(name, shape).unwrap();
                let b = conv.get(name, shape).unwrap();
                if shape.len() == 1 {
                    assert_eq!(
                        (b.dtype, b.bytes()),
                        (a.dtype, a.bytes()),
                        "{fixture} {name}"
                    );
                    continue;
                }
                assert_eq!(b.dtype, to, "{fixture} {name}");
                let (x, y) = (values(&a), values(&b));
                for (xs, ys) in x.chunks(32).zip(y.chunks(32)) {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let tol = match to {
                        DType::BF16 => amax / 256.0,
                        // Q4_0's positive extreme has no +8 level: up to a whole step.
                        DType::Q4_0 => amax / levels * (1.0 + levels / 2048.0),
                        _ => amax / levels * (0.5 + levels / 2048.0),
                    };
                    for (p, q) in xs.iter().zip(ys) {
                        assert!(
                            (p - q).abs() <= tol + 1e-9,
                            "{fixture} {name} {to}: {p} -> {q}"
                        );
                    }
                }
            }
        }
    }
}

/// Converting is all that changes: bf16 widened to f32 gives the same logits (up to summation
/// order), and
/// the quantized models' logits move with their step size (Q8_0 far less than Q4_0), in the
/// batched pass (de-quantized GEMM) and one token at a time (quantized matvec) alike.
#[test]
fn a_converted_checkpoint_moves_logits_by_its_rounding() {
    let dir = common::fixtures_dir()
        .join("tiny")
        .join("llama-tied-gqa-bf16");
    let load = |w| {
        let (config, store) = ModelFiles::open_model(&dir, w).unwrap();
        Llama::from_store(config, store, CpuBackend::new(2)).unwrap()
    };
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 128).collect();
    let logits = |m: &Llama<CpuBackend>, batched: bool| -> Vec<f32> {
        let mut cache = m.new_cache(tokens.len()).unwrap();
        let mut scratch = Scratch::new(m, tokens.len()).unwrap();
        if batched {
            return m
                .forward(
                    Pass::new(&tokens, Logits::All, &mut Dense),
                    &mut cache,
                    &mut scratch,
                )
                .unwrap();
        }
        tokens
            .iter()
            .flat_map(|t| {
                m.forward(
                    Pass::new(&[*t], Logits::Last, &mut Dense),
                    &mut cache,
                    &mut scratch,
                )
                .unwrap()
            })
            .collect()
    };
    let float = load(WeightsChoice::AsStored);
    let want = logits(&float, true);
    let max_diff = |got: &[f32]| {
        want.iter()
            .zip(got)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
    };
    let wide = load(WeightsChoice::Convert(DType::F32));
    assert_eq!(wide.dtype, DType::F32);
    // Same values; only the kernels' summation order differs.
    let d32 = max_diff(&logits(&wide, true));
    assert!(d32 < 1e-4, "bf16 -> f32 is exact, logits moved by {d32}");
    let q8 = load(WeightsChoice::Convert(DType::Q8_0));
    let q4 = load(WeightsChoice::Convert(DType::Q4_0));
    assert_eq!((q8.dtype, q4.dtype), (DType::Q8_0, DType::Q4_0));
    for batched in [true, false] {
        let (d8, d4) = (
            max_diff(&logits(&q8, batched)),
            max_diff(&logits(&q4, batched)),
        );
        eprintln!("batched {batched}: max |dlogit| q8_0 {d8:.4}, q4_0 {d4:.4}");
        assert!(
            d8 > 0.0 && d8 * 4.0 < d4,
            "batched {batched}: q8_0 {d8}, q4_0 {d4}"
        );
    }
}

/// SmolLM2-135M quantized at load (Q8_0 and Q4_0) answers the France question.
#[test]
fn smollm2_quantized_at_load_answers() {
    use sirius_offload::engine::{ChatPrompt, Decoding, Engine, EngineConfig, RequestOptions};
    let Some(dir) = common::smollm2_dir("--weights q8_0/q4_0 on SmolLM2") else {
        return;
    };
    for w in [DType::Q8_0, DType::Q4_0] {
        let cfg = EngineConfig {
            weights: WeightsChoice::Convert(w),
            ..EngineConfig::dense()
        };
        let mut engine = Engine::load(&dir, CpuBackend::new(2), &cfg).unwrap();
        let ids = engine
            .encode(
                "What is the capital of France?",
                Some(&ChatPrompt { system: None }),
            )
            .unwrap();
        let out = engine
            .generate(
                &ids,
                &RequestOptions::greedy(12),
                Decoding::Dense,
                &mut |_| true,
            )
            .unwrap();
        assert!(out.text.contains("Paris"), "{w}: {:?}", out.text);
    }
}

/// CATS reads float bundles: on quantized weights it says how to run (bf16, or Griffin).
#[test]
fn cats_on_quantized_weights_names_the_way_out() {
    let Some(dir) = common::smollm2_dir("CATS on --weights q8_0") else {
        return;
    };
    let dir = dir.to_string_lossy();
    let out = common::run_bin(&[
        "run",
        "-m",
        &dir,
        "--weights",
        "q8_0",
        "--sparsity",
        "cats",
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    ]);
    common::assert_one_line_failure(&out, "--weights bf16 (Griffin, --sparsity griffin");
}
