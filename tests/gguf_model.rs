//! The native GGUF loader against the offline converter (`tools/convert_gguf.py`, the `gguf`
//! Python package): SmolLM2-135M's Q4_1 GGUF, loaded by `--model FILE.gguf`, must hold the same
//! weights, tokenizer, chat template and stop ids as the directory converted from it, and
//! decode the same greedy tokens.
//!
//! Without the fetched model these tests print why they are skipped; with
//! SIRIUS_REQUIRE_MODELS=1 (as in CI) a missing model is a failure.

mod common;

use std::path::PathBuf;

use sirius_offload::backend::CpuBackend;
use sirius_offload::engine::{ChatPrompt, Decoding, Engine, EngineConfig, RequestOptions};
use sirius_offload::model::chat::ChatMessage;
use sirius_offload::model::{ModelFiles, WeightsChoice};
use sirius_offload::tensor::DType;

/// The converted directory and the GGUF that `tools/fetch-model` keeps beside it.
fn paths() -> Option<(PathBuf, PathBuf)> {
    let gguf = common::smollm2_gguf("GGUF loader tests")?;
    let dir = gguf.parent()?.to_path_buf();
    Some((dir, gguf))
}

fn bf16_round(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

#[test]
fn the_gguf_holds_the_weights_the_converter_wrote() {
    let Some((dir, gguf)) = paths() else { return };
    let from_gguf = ModelFiles::open_with(&gguf, WeightsChoice::Convert(DType::BF16)).unwrap();
    let native = ModelFiles::open(&gguf).unwrap();
    let from_dir = ModelFiles::open(&dir).unwrap();
    let (a, b) = (&from_gguf.config, &from_dir.config);
    assert_eq!(
        (
            a.hidden_size,
            a.intermediate_size,
            a.num_layers,
            a.num_heads,
            a.num_kv_heads
        ),
        (
            b.hidden_size,
            b.intermediate_size,
            b.num_layers,
            b.num_heads,
            b.num_kv_heads
        )
    );
    assert_eq!(
        (a.head_dim, a.vocab_size, a.tie_word_embeddings),
        (b.head_dim, b.vocab_size, b.tie_word_embeddings)
    );
    assert_eq!(
        (a.rope_theta, a.rms_norm_eps, a.max_position_embeddings),
        (b.rope_theta, b.rms_norm_eps, b.max_position_embeddings)
    );
    let shapes = from_gguf.weights.shapes();
    assert_eq!(shapes, from_dir.weights.shapes(), "tensor names and shapes");
    let mut matrices = 0;
    for (name, shape) in shapes {
        let x = from_gguf.weights.get(name, shape).unwrap();
        let y = from_dir.weights.get(name, shape).unwrap();
        if shape.len() == 2 {
            // De-quantized and rounded to bf16 the same way, Q/K rows un-interleaved alike.
            assert!(x.bytes() == y.bytes(), "{name}: bytes differ");
            // As stored: the same values once de-quantized (rows moved whole, blocks intact).
            let q = native.weights.get(name, shape).unwrap();
            assert!(q.dtype.is_quantized(), "{name} is {}", q.dtype);
            let rounded: Vec<f32> = q.to_f32().into_iter().map(bf16_round).collect();
            assert!(rounded == y.to_f32(), "{name}: quantized values differ");
            matrices += 1;
        } else {
            // Norms stay f32 in the native loader; the converter rounded them to bf16.
            let rounded: Vec<f32> = x.to_f32().into_iter().map(bf16_round).collect();
            assert_eq!(rounded, y.to_f32(), "{name}");
        }
    }
    assert_eq!(matrices, 1 + 30 * 7, "embedding + 7 matrices per layer");
}

#[test]
fn the_tokenizer_template_and_stop_ids_come_from_the_metadata() {
    let Some((dir, gguf)) = paths() else { return };
    let from_gguf = ModelFiles::open(&gguf).unwrap().text;
    let from_dir = ModelFiles::open(&dir).unwrap().text;
    assert_eq!(from_gguf.stop_ids, from_dir.stop_ids);
    assert_eq!(
        from_gguf.tokenizer.vocab_size(),
        from_dir.tokenizer.vocab_size()
    );
    for text in [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "Digits: 12345 and 3.14159, year 2024.",
        "Unicode: naïve café, Straße, 東京, Ελληνικά. Emoji: 🦀🚀",
        "  leading spaces\n\ttabs and\nnewlines  ",
        "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    ] {
        for special in [false, true] {
            let ids = from_gguf.tokenizer.encode(text, special).unwrap();
            assert_eq!(
                ids,
                from_dir.tokenizer.encode(text, special).unwrap(),
                "{text:?}"
            );
            assert_eq!(from_gguf.tokenizer.decode(&ids, false).unwrap(), text);
        }
    }
    let messages = [
        ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "What is 2 + 2?".into(),
        },
    ];
    let render = |t: &Option<sirius_offload::model::chat::ChatTemplate>| {
        t.as_ref()
            .expect("a chat template")
            .render(&messages)
            .unwrap()
    };
    assert_eq!(
        render(&from_gguf.chat_template),
        render(&from_dir.chat_template)
    );
}

#[test]
fn greedy_tokens_of_the_dequantized_gguf_equal_the_converted_models() {
    let Some((dir, gguf)) = paths() else { return };
    // The GGUF de-quantized to bf16: the same weights as the converted directory.
    let config = EngineConfig {
        weights: WeightsChoice::Convert(DType::BF16),
        ..EngineConfig::dense()
    };
    let mut native = Engine::load(&gguf, CpuBackend::new(2), &config).unwrap();
    let mut converted = Engine::load(&dir, CpuBackend::new(2), &EngineConfig::dense()).unwrap();
    let chat = ChatPrompt { system: None };
    for prompt in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers and explain why 1 is not prime.",
        "Explain what a GGUF file is in two sentences.",
    ] {
        let ids = native.encode(prompt, Some(&chat)).unwrap();
        assert_eq!(ids, converted.encode(prompt, Some(&chat)).unwrap());
        let opts = RequestOptions {
            context: Some(1024),
            ..RequestOptions::greedy(48)
        };
        let run = |e: &mut Engine<CpuBackend>| {
            e.generate(&ids, &opts, Decoding::Dense, &mut |_| true)
                .unwrap()
        };
        let (a, b) = (run(&mut native), run(&mut converted));
        assert_eq!(
            a.generated_token_ids, b.generated_token_ids,
            "{prompt:?}: {:?} vs {:?}",
            a.text, b.text
        );
        if prompt.contains("France") {
            assert!(a.text.contains("Paris"), "{:?}", a.text);
        }
    }
}

#[test]
fn run_takes_a_gguf_file_as_the_model() {
    let Some((_, gguf)) = paths() else { return };
    let gguf = gguf.display().to_string();
    let out = common::run_bin(&[
        "run",
        "--model",
        &gguf,
        "--prompt",
        "What is the capital of France?",
        "--chat",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
    ]);
    assert!(out.status.success(), "{}", common::stderr_of(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn broken_gguf_files_are_one_line_errors_naming_the_file() {
    let Some((_, gguf)) = paths() else { return };
    let bytes = std::fs::read(&gguf).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "truncated.gguf",
            bytes[..bytes.len() / 2].to_vec(),
            "run past the end of the file",
        ),
        (
            "header-only.gguf",
            bytes[..4096].to_vec(),
            "tensors cannot fit",
        ),
        (
            "not-gguf.gguf",
            b"PK\x03\x04 a zip, not a GGUF".to_vec(),
            "not \"GGUF\"",
        ),
    ];
    for (name, data, needle) in cases {
        let path = tmp.path().join(name);
        std::fs::write(&path, data).unwrap();
        let path = path.display().to_string();
        let out = common::run_bin(&[
            "run",
            "--model",
            &path,
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
        ]);
        common::assert_one_line_failure(&out, needle);
        common::assert_clean_failure(&out, name);
    }
}

/// Largest bf16 logit lead (top-1 minus the token the quantized model chose) this test
/// accepts where the two disagree: the 8-bit activations of the quantized kernels move logits
/// by about this much, so only near-ties may flip.
const NEAR_TIE: f32 = 0.5;

#[test]
fn quantized_compute_differs_from_the_bf16_weights_only_at_near_ties() {
    use sirius_offload::model::{sampler::argmax, Llama, Logits, Pass, Scratch};
    use sirius_offload::sparsity::Dense;
    let Some((_, gguf)) = paths() else { return };
    let load = |w: WeightsChoice| {
        let files = ModelFiles::open_with(&gguf, w).unwrap();
        let chat = files.text.chat_template.unwrap();
        let model = Llama::from_store(files.config, files.weights, CpuBackend::new(2)).unwrap();
        (model, chat, files.text.tokenizer)
    };
    let (quantized, chat, tok) = load(WeightsChoice::AsStored);
    let (float, _, _) = load(WeightsChoice::Convert(DType::BF16));
    assert_eq!(quantized.dtype, DType::Q4_1);
    let (mut flips, mut worst, mut compared) = (0, 0f32, 0);
    for prompt in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers and explain why 1 is not prime.",
        "Explain what a GGUF file is in two sentences.",
    ] {
        let text = chat
            .render(&[ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }])
            .unwrap();
        let ids = tok.encode(&text, false).unwrap();
        let generated = common::full_greedy(&quantized, &ids, 32);
        // The bf16 model, teacher-forced along the quantized model's tokens.
        let all: Vec<u32> = ids.iter().chain(&generated).copied().collect();
        let mut cache = float.new_cache(all.len()).unwrap();
        let mut scratch = Scratch::new(&float, all.len()).unwrap();
        let logits = float
            .forward(
                Pass::new(&all, Logits::All, &mut Dense),
                &mut cache,
                &mut scratch,
            )
            .unwrap();
        let vocab = float.config.vocab_size;
        for (i, &chosen) in generated.iter().enumerate() {
            let row = &logits[(ids.len() + i - 1) * vocab..(ids.len() + i) * vocab];
            let best = argmax(row);
            compared += 1;
            if best != chosen {
                let lead = row[best as usize] - row[chosen as usize];
                flips += 1;
                worst = worst.max(lead);
                assert!(
                    lead <= NEAR_TIE,
                    "{prompt:?} token {i}: bf16 prefers {best} by {lead} over the quantized model's {chosen}"
                );
            }
        }
    }
    eprintln!(
        "quantized vs bf16: {flips} of {compared} tokens differ, largest bf16 lead {worst:.3}"
    );
}

/// Logits predicting `all[prompt..]`, teacher-forced: the prompt through the dense FFN (and
/// Griffin's scores when `sparsity` is given), the rest through `sparsity`'s decode FFN.
/// Also returns the neurons Griffin kept per layer.
fn teacher_forced<B: sirius_offload::backend::SparseOps>(
    model: &sirius_offload::model::Llama<B>,
    all: &[u32],
    prompt: usize,
    sparsity: Option<&sirius_offload::sparsity::SparsityConfig>,
) -> (Vec<f32>, Vec<usize>) {
    use sirius_offload::model::{Logits, Pass, Scratch};
    use sirius_offload::sparsity::{SparseRequest, Sparsity};
    let mut cache = model.new_cache(all.len()).unwrap();
    let mut scratch = Scratch::new(model, all.len()).unwrap();
    let built = sparsity.map(|cfg| model.sparsity(cfg).unwrap());
    let none = Sparsity::None;
    let s = built.as_ref().unwrap_or(&none);
    assert!(
        s.bundles().is_none(),
        "quantized Griffin must not build float bundles"
    );
    let mut req = SparseRequest::new(s, &model.backend, model.ffn_dims()).unwrap();
    let mut logits = model
        .forward(
            Pass::new(&all[..prompt], Logits::Last, req.prefill_ffn()),
            &mut cache,
            &mut scratch,
        )
        .unwrap();
    req.finish_prefill(&model.backend).unwrap();
    let kept = req.griffin().map(|g| g.kept()).unwrap_or_default();
    let rest = &all[prompt..all.len() - 1];
    logits.extend(
        model
            .forward(
                Pass::new(rest, Logits::All, req.decode_ffn().unwrap()),
                &mut cache,
                &mut scratch,
            )
            .unwrap(),
    );
    (logits, kept)
}

/// Where two logit matrices' top-1 tokens differ, `b`'s lead over `a`'s choice must be a
/// near-tie. Returns (differing rows, largest lead, largest |logit difference|).
fn near_ties_only(a: &[f32], b: &[f32], vocab: usize, what: &str) -> (usize, f32, f32) {
    use sirius_offload::model::sampler::argmax;
    let (mut flips, mut worst) = (0, 0f32);
    for (i, (ra, rb)) in a.chunks(vocab).zip(b.chunks(vocab)).enumerate() {
        let (ta, tb) = (argmax(ra), argmax(rb));
        if ta != tb {
            let lead = rb[tb as usize] - rb[ta as usize];
            flips += 1;
            worst = worst.max(lead);
            assert!(
                lead <= NEAR_TIE,
                "{what}, row {i}: {tb} leads {ta} by {lead}"
            );
        }
    }
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (flips, worst, diff)
}

/// Griffin on the quantized file gathers straight from the Q4_1 matrices (gate/up rows as
/// stored, the down matrix re-encoded): every neuron kept with an exact (f32) down matrix
/// is the dense quantized model; the default Q8_0 down
/// matrix differs from the exact one only at near-ties; kept counts round up to whole
/// 32-blocks.
#[test]
fn griffin_gathers_from_the_quantized_matrices() {
    use sirius_offload::model::Llama;
    use sirius_offload::sparsity::{SparsityConfig, SparsityMode};
    let Some((_, gguf)) = paths() else { return };
    let files = ModelFiles::open_with(&gguf, WeightsChoice::AsStored).unwrap();
    let chat = files.text.chat_template.unwrap();
    let tok = files.text.tokenizer;
    let model = Llama::from_store(files.config, files.weights, CpuBackend::new(2)).unwrap();
    assert_eq!(model.dtype, DType::Q4_1);
    let vocab = model.config.vocab_size;
    let text = chat
        .render(&[ChatMessage {
            role: "user".into(),
            content: "Write a haiku about the sea.".into(),
        }])
        .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let all: Vec<u32> = ids
        .iter()
        .chain(&common::full_greedy(&model, &ids, 24))
        .copied()
        .collect();
    let griffin = |keep: f32, down: DType| {
        let mut c = SparsityConfig::new(SparsityMode::Griffin, keep);
        c.griffin_down = down;
        c
    };
    let (dense, _) = teacher_forced(&model, &all, ids.len(), None);
    let (full, kept) = teacher_forced(&model, &all, ids.len(), Some(&griffin(1.0, DType::F32)));
    assert_eq!(kept, vec![1536; 30]);
    let r = near_ties_only(&dense, &full, vocab, "keep 1.0, f32 down vs dense");
    eprintln!(
        "keep 1.0 (f32 down) vs dense quantized: {} rows differ, lead {:.3}, max |dlogit| {:.3}",
        r.0, r.1, r.2
    );
    // Teacher forcing runs one batch, where both de-quantize the same values exactly.
    assert_eq!(
        r.2, 0.0,
        "keep 1.0 with an exact down matrix is the dense model"
    );

    let (exact, kept) = teacher_forced(&model, &all, ids.len(), Some(&griffin(0.5, DType::F32)));
    assert_eq!(kept, vec![768; 30]);
    let (q8, _) = teacher_forced(&model, &all, ids.len(), Some(&griffin(0.5, DType::Q8_0)));
    let r = near_ties_only(&exact, &q8, vocab, "keep 0.5, q8_0 down vs f32 down");
    eprintln!(
        "keep 0.5 q8_0 down vs f32 down: {} rows differ, lead {:.3}, max |dlogit| {:.3}",
        r.0, r.1, r.2
    );
    assert!(r.2 > 0.0, "the Q8_0 down matrix should round something");

    // round(0.3 * 1536) = 461 rounds up to 480 = 15 whole blocks.
    let (_, kept) = teacher_forced(&model, &all, ids.len(), Some(&griffin(0.3, DType::Q8_0)));
    assert_eq!(kept, vec![480; 30]);
}
