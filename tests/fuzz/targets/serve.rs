//! The server's request bodies (`/v1/chat/completions`, `/v1/completions`) mutated field by
//! field, parsed and checked by `parse_chat` / `parse_completion` as the routes call them,
//! under a sampling engine's defaults and a greedy-only (Sirius) engine's.

use std::path::Path;

use serde_json::{json, Value};
use sirius_offload::serve::api::{parse_chat, parse_completion, Input, JobSpec, RequestDefaults};

use crate::fuzz::{json as fjson, Case, Rng, Target, Verdict};

const KEYS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "include_usage",
    "n",
    "logprobs",
    "echo",
    "best_of",
    "suffix",
    "tools",
    "tool_choice",
    "functions",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "top_logprobs",
];
const MODEL: &str = "smollm2-135m";

pub struct Serve {
    chats: Vec<Value>,
    completions: Vec<Value>,
}

impl Serve {
    pub fn new() -> Serve {
        let chats = vec![
            json!({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}], "max_tokens": 16, "temperature": 0.7,
                "top_p": 0.9, "stop": ["\n", "END"], "seed": 7, "stream": true,
                "stream_options": {"include_usage": true}}),
            json!({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                {"type": "text", "text": "b"}]}, {"role": "assistant", "content": null},
                {"role": "user", "content": "c"}], "max_completion_tokens": 4, "n": 1,
                "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
                "presence_penalty": 0, "logprobs": false}),
        ];
        let completions = vec![
            json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 8, "temperature": 0,
                "stop": "\n", "echo": false, "best_of": 1}),
            json!({"prompt": ["one"], "stream": false, "frequency_penalty": 0.0, "logit_bias": {}}),
        ];
        Serve { chats, completions }
    }
}

fn defaults(greedy: bool) -> RequestDefaults {
    RequestDefaults {
        max_tokens: 256,
        temperature: if greedy { 0.0 } else { 0.7 },
        top_k: 40,
        top_p: 0.95,
        greedy_only: greedy.then_some("Sirius decodes greedily"),
    }
}

/// What a queued request must satisfy.
fn consistent(spec: &JobSpec, greedy: bool) -> Result<(), String> {
    let s = &spec.sampling;
    if spec.max_tokens == 0 {
        return Err("accepted max_tokens 0".into());
    }
    if !(0.0..=2.0).contains(&s.temperature) || (greedy && s.temperature != 0.0) {
        return Err(format!("accepted temperature {}", s.temperature));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(format!("accepted top_p {}", s.top_p));
    }
    if spec.stop.len() > 4 || spec.stop.iter().any(|s| s.is_empty() || s.len() > 1024) {
        return Err(format!("accepted stop strings {:?}", spec.stop));
    }
    if let Input::Chat(messages) = &spec.input {
        let roles = ["system", "user", "assistant"];
        if messages.is_empty() || messages.iter().any(|m| !roles.contains(&m.role.as_str())) {
            return Err("accepted an empty conversation or an unknown role".into());
        }
    }
    Ok(())
}

impl Target for Serve {
    const NAME: &'static str = "serve_requests";

    fn make(&self, rng: &mut Rng) -> Case {
        let chat = rng.one_in(2);
        let seed = rng
            .pick(if chat { &self.chats } else { &self.completions })
            .clone();
        let name = if chat { "chat.json" } else { "completion.json" };
        let mut case = Case::one(name, fjson::mutate(rng, &seed, KEYS));
        case.deep = rng.one_in(3);
        case
    }

    fn check(&self, case: &Case, _dir: &Path) -> Result<Verdict, String> {
        let greedy = case.deep;
        let d = defaults(greedy);
        let result = match case.file("chat.json") {
            Some(body) => parse_chat(body, &d, MODEL),
            None => parse_completion(case.file("completion.json").unwrap_or_default(), &d, MODEL),
        };
        match result {
            Ok(spec) => consistent(&spec, greedy).map(|()| Verdict::Accepted),
            Err(e) => {
                let msg = &e.message;
                if msg.trim().is_empty() || msg.contains('\n') {
                    return Err(format!("the error is not one line: {msg:?}"));
                }
                if !e.status.is_client_error() {
                    return Err(format!("a bad request answered {}: {msg}", e.status));
                }
                let _ = e.body();
                Ok(Verdict::Refused)
            }
        }
    }

    fn min_accepted(&self) -> f64 {
        0.02
    }
}
