//! The forward pass against itself (batched vs incremental vs chunked) and against the golden
//! logits of the independent numpy reference (tools/reference) on tiny random models.

mod common;

use common::{fixtures_dir, write_model, TinySpec};
use sirius_offload::backend::CpuBackend;
use sirius_offload::model::Pass;
use sirius_offload::model::{Llama, Logits, Scratch};
use sirius_offload::sparsity::Dense;
use sirius_offload::tensor::KvDType;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn all_logits_batched(model: &Llama<CpuBackend>, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(tokens.len()).unwrap();
    let mut scratch = Scratch::new(model, tokens.len()).unwrap();
    model
        .forward(
            Pass::new(tokens, Logits::All, &mut Dense),
            &mut cache,
            &mut scratch,
        )
        .unwrap()
}

fn all_logits_one_by_one(model: &Llama<CpuBackend>, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache(tokens.len()).unwrap();
    let mut scratch = Scratch::new(model, 1).unwrap();
    tokens
        .iter()
        .flat_map(|&t| {
            model
                .forward(
                    Pass::new(&[t], Logits::Last, &mut Dense),
                    &mut cache,
                    &mut scratch,
                )
                .unwrap()
        })
        .collect()
}

#[test]
fn incremental_decode_matches_batched_forward() {
    for (threads, spec) in [
        (1, TinySpec::default()),
        (
            2,
            TinySpec {
                tied: false,
                dtype: "F32",
                kv_heads: 4,
                ..TinySpec::default()
            },
        ),
        (
            3,
            TinySpec {
                arch: "Qwen2ForCausalLM",
                qkv_bias: true,
                dtype: "F16",
                ..TinySpec::default()
            },
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = write_model(tmp.path(), &spec, 5);
        let model = Llama::load(&dir, CpuBackend::new(threads)).unwrap();
        let tokens: Vec<u32> = (0..13).map(|i| (i * 7 + 3) % 64).collect();
        let a = all_logits_batched(&model, &tokens);
        let b = all_logits_one_by_one(&model, &tokens);
        let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.1, "logits should not be degenerate");
        let d = max_abs_diff(&a, &b);
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "{}: batched vs incremental differ by {d}",
            spec.arch
        );
    }
}

#[test]
fn chunked_prefill_matches_and_truncate_rewinds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model(tmp.path(), &TinySpec::default(), 9);
    let model = Llama::load(&dir, CpuBackend::new(2)).unwrap();
    let tokens: Vec<u32> = (0..10).map(|i| (i * 5 + 1) % 64).collect();
    let full = all_logits_batched(&model, &tokens);
    let vocab = model.config.vocab_size;
    let mut cache = model.new_cache(16).unwrap();
    let mut scratch = Scratch::new(&model, 4).unwrap();
    model
        .forward(
            Pass::new(&tokens[..4], Logits::None, &mut Dense),
            &mut cache,
            &mut scratch,
        )
        .unwrap();
    model
        .forward(
            Pass::new(&tokens[4..8], Logits::None, &mut Dense),
            &mut cache,
            &mut scratch,
        )
        .unwrap();
    // Write two wrong tokens, then roll them back: the cache must be as if they never were.
    model
        .forward(
            Pass::new(&[0, 0], Logits::None, &mut Dense),
            &mut cache,
            &mut scratch,
        )
        .unwrap();
    cache.truncate(8);
    let last = model
        .forward(
            Pass::new(&tokens[8..], Logits::All, &mut Dense),
            &mut cache,
            &mut scratch,
        )
        .unwrap();
    let d = max_abs_diff(&last, &full[8 * vocab..]);
    assert!(d < 1e-4, "chunked+rollback vs batched differ by {d}");
}

#[test]
fn context_overflow_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model(tmp.path(), &TinySpec::default(), 9);
    let model = Llama::load(&dir, CpuBackend::new(1)).unwrap();
    let mut cache = model.new_cache(4).unwrap();
    let mut scratch = Scratch::new(&model, 8).unwrap();
    let err = model
        .forward(
            Pass::new(&[1, 2, 3, 4, 5], Logits::Last, &mut Dense),
            &mut cache,
            &mut scratch,
        )
        .unwrap_err();
    assert!(err.to_string().contains("KV cache is full"), "{err}");
    let err = model
        .forward(
            Pass::new(&[1, 999], Logits::Last, &mut Dense),
            &mut cache,
            &mut scratch,
        )
        .unwrap_err();
    assert!(err.to_string().contains("999"), "{err}");
}

/// Golden logits from tools/reference/llama_ref.py (float64 numpy) for each tiny model in
/// tests/fixtures/tiny. Regenerate with `python3 tools/reference/make_fixtures.py`.
#[test]
fn tiny_models_match_the_numpy_reference() {
    let root = fixtures_dir().join("tiny");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("fixtures missing at {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("logits.json").is_file())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 4,
        "expected at least 4 tiny fixtures in {}",
        root.display()
    );
    for dir in dirs {
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("logits.json")).unwrap()).unwrap();
        let tokens: Vec<u32> = fixture["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let expected: Vec<f32> = fixture["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        // The reference keeps K and V in float64; an f16 cache rounds each to 11 bits, which
        // moves these logits by ~1e-3 of their scale: its own, looser bound.
        for (kv_dtype, tol) in [(KvDType::F32, 2e-4), (KvDType::F16, 4e-3)] {
            for threads in [1, 2] {
                let mut model = Llama::load(&dir, CpuBackend::new(threads)).unwrap();
                model.kv_dtype = kv_dtype;
                let got = all_logits_batched(&model, &tokens);
                let scale = expected.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1.0);
                let d = max_abs_diff(&got, &expected);
                assert!(
                    d <= tol * scale,
                    "{} ({kv_dtype} cache): max |diff| {d} (logit scale {scale})",
                    dir.display()
                );
                let inc = all_logits_one_by_one(&model, &tokens);
                let d = max_abs_diff(&inc, &expected);
                assert!(
                    d <= tol * scale,
                    "{} ({kv_dtype} cache) incremental: max |diff| {d}",
                    dir.display()
                );
            }
        }
    }
}

/// `attention_bias` (q/k/v/o biases) and `mlp_bias` (gate/up/down biases) are loaded and
/// applied: zero biases change nothing, a non-zero one changes the logits.
#[test]
fn llama_attention_and_mlp_biases_are_applied() {
    use common::{encode, random_tensors, write_model_with, RawTensor};
    let spec = TinySpec::default();
    let tokens: Vec<u32> = (0..6).map(|i| (i * 11 + 4) % 64).collect();
    let tmp = tempfile::tempdir().unwrap();
    let plain = write_model(&tmp.path().join("plain"), &spec, 21);
    let base = all_logits_batched(&Llama::load(&plain, CpuBackend::new(1)).unwrap(), &tokens);

    let with_biases = |value: f32, name: &str| {
        let mut tensors = random_tensors(&spec, 21);
        let hd = spec.hidden / spec.heads;
        for layer in 0..spec.layers {
            for (proj, len) in [
                ("self_attn.q_proj", spec.heads * hd),
                ("self_attn.k_proj", spec.kv_heads * hd),
                ("self_attn.v_proj", spec.kv_heads * hd),
                ("self_attn.o_proj", spec.hidden),
                ("mlp.gate_proj", spec.ffn),
                ("mlp.up_proj", spec.ffn),
                ("mlp.down_proj", spec.hidden),
            ] {
                let bias_name = format!("model.layers.{layer}.{proj}.bias");
                let v = if bias_name.contains(name) { value } else { 0.0 };
                tensors.insert(
                    bias_name,
                    RawTensor {
                        dtype: spec.dtype,
                        shape: vec![len],
                        data: encode(&vec![v; len], spec.dtype),
                    },
                );
            }
        }
        let dir = write_model_with(&tmp.path().join(format!("b{value}{name}")), &spec, tensors);
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        cfg["attention_bias"] = true.into();
        cfg["mlp_bias"] = true.into();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        all_logits_batched(&Llama::load(&dir, CpuBackend::new(1)).unwrap(), &tokens)
    };
    assert!(max_abs_diff(&with_biases(0.0, "none"), &base) < 1e-5);
    for proj in ["o_proj", "down_proj", "up_proj"] {
        assert!(
            max_abs_diff(&with_biases(0.5, proj), &base) > 1e-2,
            "{proj} bias had no effect"
        );
    }
}
