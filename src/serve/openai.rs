//! Response bodies in OpenAI's shapes: whole completions, and the chunks of a stream.

use serde_json::{json, Value};

use crate::engine::StopReason;
use crate::serve::api::Endpoint;
use crate::serve::worker::Finish;

/// What every body of one response shares.
pub struct ResponseIds {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl ResponseIds {
    pub fn new(endpoint: Endpoint, model: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        ResponseIds {
            id: format!(
                "{prefix}-{created:x}{:06x}",
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            created,
            model: model.to_string(),
            endpoint,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    /// The whole answer of a non-streamed request.
    pub fn completion(&self, text: &str, finish: &Finish) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason(finish.reason),
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason(finish.reason),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(finish),
        })
    }

    /// A stream chunk: the assistant role first (chat), then text, then the finish reason
    /// (with the usage, unless a usage-only chunk follows: `Piece::Finish(f, false)`).
    pub fn chunk(&self, piece: Piece<'_>) -> Value {
        let (delta, finish, usage_value) = match piece {
            Piece::Role => (
                json!({"role": "assistant", "content": ""}),
                Value::Null,
                None,
            ),
            Piece::Text(t) => (json!({"content": t}), Value::Null, None),
            Piece::Finish(f, with_usage) => (
                json!({}),
                finish_reason(f.reason).into(),
                with_usage.then(|| usage(f)),
            ),
        };
        let choice = match (self.endpoint, &piece) {
            (Endpoint::Chat, _) => {
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            (Endpoint::Completion, Piece::Text(t)) => {
                json!({"index": 0, "text": t, "logprobs": null, "finish_reason": finish})
            }
            (Endpoint::Completion, _) => {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish})
            }
        };
        let mut chunk = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if let (Some(u), Some(map)) = (usage_value, chunk.as_object_mut()) {
            map.insert("usage".into(), u);
        }
        chunk
    }

    /// The last chunk of `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, finish: &Finish) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage(finish),
        })
    }
}

/// One step of a stream.
pub enum Piece<'a> {
    Role,
    Text(&'a str),
    /// The finish reason, and whether this chunk carries the usage.
    Finish(&'a Finish, bool),
}

fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::Eos | StopReason::StopString | StopReason::Cancelled => "stop",
    }
}

fn usage(f: &Finish) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_prompt_tokens},
    })
}
