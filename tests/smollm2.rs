//! The real SmolLM2-135M-Instruct checkpoint (fetched by `tools/fetch-model smollm2-135m`):
//! tokenizer round trips and greedy tokens exactly equal to the numpy reference's.
//!
//! Without the model these tests print why they are skipped; with SIRIUS_REQUIRE_MODELS=1
//! (as in CI) a missing model is a failure.

mod common;

use std::path::PathBuf;

use common::fixtures_dir;
use sirius_offload::backend::CpuBackend;
use sirius_offload::engine::{Decoding, Engine, EngineConfig, RequestOptions};
use sirius_offload::model::chat::{ChatMessage, ChatTemplate};
use sirius_offload::model::{TextStream, Tokenizer};

fn model_dir() -> Option<PathBuf> {
    common::smollm2_dir("SmolLM2 tests")
}

#[test]
fn tokenizer_round_trips_and_knows_special_tokens() {
    let Some(dir) = model_dir() else { return };
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    for text in [
        "Hello, world!",
        "  two  spaces",
        "1234567 digits",
        "naïve café — 東京 🚀",
        "line\nbreak\ttab",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        // Streaming yields the same text, in whole characters.
        let mut stream = TextStream::new(&tok);
        let mut out = String::new();
        for &id in &ids {
            if let Some(piece) = stream.push(id).unwrap() {
                out.push_str(&piece);
            }
        }
        if let Some(rest) = stream.finish().unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, text);
    }
    // SmolLM2 splits digits one by one.
    assert_eq!(tok.encode("2024", false).unwrap().len(), 4);
    let im_start = tok
        .token_to_id("<|im_start|>")
        .expect("<|im_start|> in vocab");
    let ids = tok.encode("<|im_start|>user", false).unwrap();
    assert_eq!(ids[0], im_start, "special token in raw text must be one id");
}

#[test]
fn greedy_tokens_equal_the_reference() {
    let Some(dir) = model_dir() else { return };
    let path = fixtures_dir().join("smollm2_greedy.json");
    let fixture: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap();
    let mut engine = Engine::load(&dir, CpuBackend::new(2), &EngineConfig::dense()).unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let eos = engine.stop_ids.clone();
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["prompt_text"].as_str().unwrap();
        let ids = |key: &str| -> Vec<u32> {
            case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let prompt_ids = ids("prompt_ids");
        if case["kind"] == "chat" {
            // Our minijinja rendering of the model's template equals the reference's Jinja2 one.
            let template = ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json"))
                .unwrap()
                .unwrap();
            let messages: Vec<ChatMessage> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| ChatMessage {
                    role: m["role"].as_str().unwrap().into(),
                    content: m["content"].as_str().unwrap().into(),
                })
                .collect();
            assert_eq!(template.render(&messages).unwrap(), text);
        }
        assert_eq!(
            tok.encode(text, false).unwrap(),
            prompt_ids,
            "tokenization of {text:?}"
        );
        let mut expected = ids("greedy_ids");
        // The reference keeps the EOS it stopped at; the runtime stops before emitting it.
        let stopped_at_eos = case["stopped_at_eos"].as_bool().unwrap_or(false);
        if stopped_at_eos {
            let eos_id = expected.pop().expect("an EOS id");
            assert!(
                eos.contains(&eos_id),
                "fixture EOS {eos_id} is not among the model's stop ids {eos:?}"
            );
        }
        let opts = RequestOptions {
            context: Some(2048),
            ..RequestOptions::greedy(expected.len() + usize::from(stopped_at_eos))
        };
        let out = engine
            .generate(&prompt_ids, &opts, Decoding::Dense, &mut |_| true)
            .unwrap();
        assert_eq!(
            out.generated_token_ids, expected,
            "greedy tokens for {text:?}: got {:?}",
            out.text
        );
        if stopped_at_eos {
            assert_eq!(out.stop_reason, sirius_offload::engine::StopReason::Eos);
        }
        if case["kind"] == "chat" {
            assert!(
                out.text.contains("Paris"),
                "the France question should be answered with Paris: {:?}",
                out.text
            );
        }
    }
}
