//! The request bodies of `/v1/chat/completions` and `/v1/completions`, parsed and checked
//! into one [`JobSpec`] before anything is queued: every field this server honours, and a 400
//! naming the field for anything it cannot do (rather than silently ignoring it).

use serde::Deserialize;

use crate::model::chat::ChatMessage;
use crate::model::SamplingParams;
use crate::serve::body::{object, read};
use crate::serve::error::ApiError;

/// Which endpoint a request came through (its response objects differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A conversation, rendered by the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text (special tokens written in it are recognised).
    Text(String),
}

/// One checked request.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub endpoint: Endpoint,
    pub input: Input,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage and no choices.
    pub include_usage: bool,
}

/// What a request gets for the fields it leaves out, and what the engine allows.
#[derive(Debug, Clone)]
pub struct RequestDefaults {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    /// Why requests must be greedy, when they must (Sirius correction, offloaded runs).
    pub greedy_only: Option<&'static str>,
}

/// The most stop strings a request may give (OpenAI's limit), and their longest (matching
/// held-back text costs time in their length on the engine's thread).
const MAX_STOPS: usize = 4;
const MAX_STOP_BYTES: usize = 1024;

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop: Option<OneOrMany>,
    seed: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u64>,
    logprobs: Option<serde_json::Value>,
    echo: Option<bool>,
    best_of: Option<u64>,
    suffix: Option<String>,
    /// Fields this server does not implement: refused when they ask for something.
    tools: Option<serde_json::Value>,
    tool_choice: Option<serde_json::Value>,
    functions: Option<serde_json::Value>,
    response_format: Option<serde_json::Value>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<serde_json::Value>,
    top_logprobs: Option<serde_json::Value>,
}

impl Common {
    /// The first field asking for what this server does not do, with why.
    fn unsupported(&self) -> Option<(&'static str, &'static str)> {
        use serde_json::Value;
        let asks = |v: &Option<Value>| match v {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        let text_format = |v: &Option<Value>| {
            v.as_ref()
                .and_then(|f| f.get("type"))
                .and_then(Value::as_str)
                == Some("text")
        };
        let tool_choice_none =
            |v: &Option<Value>| v.as_ref().and_then(Value::as_str) == Some("none");
        [
            ("tools", asks(&self.tools), "tool calls are not supported"),
            (
                "functions",
                asks(&self.functions),
                "function calls are not supported",
            ),
            (
                "tool_choice",
                asks(&self.tool_choice) && !tool_choice_none(&self.tool_choice),
                "tool calls are not supported",
            ),
            (
                "response_format",
                asks(&self.response_format) && !text_format(&self.response_format),
                "only text responses are supported (no JSON mode or schema)",
            ),
            (
                "presence_penalty",
                self.presence_penalty.is_some_and(|p| p != 0.0),
                "penalties are not supported",
            ),
            (
                "frequency_penalty",
                self.frequency_penalty.is_some_and(|p| p != 0.0),
                "penalties are not supported",
            ),
            (
                "logit_bias",
                asks(&self.logit_bias),
                "logit_bias is not supported",
            ),
            (
                "top_logprobs",
                asks(&self.top_logprobs),
                "logprobs are not supported",
            ),
        ]
        .into_iter()
        .find(|(_, asked, _)| *asked)
        .map(|(field, _, why)| (field, why))
    }
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// A `/v1/chat/completions` body.
pub fn parse_chat(
    body: &[u8],
    defaults: &RequestDefaults,
    model_id: &str,
) -> Result<JobSpec, ApiError> {
    let body = object(body)?;
    let common: Common = read(&body, "")?;
    let messages: Vec<Message> =
        match body.get("messages") {
            Some(m) => read(m, "messages")?,
            None => return Err(ApiError::invalid(
                "messages",
                "the request has no `messages`: give a list of {\"role\", \"content\"} messages",
            )),
        };
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must hold at least one message",
        ));
    }
    let messages = messages
        .into_iter()
        .map(message)
        .collect::<Result<_, _>>()?;
    finish(
        Endpoint::Chat,
        Input::Chat(messages),
        common,
        defaults,
        model_id,
    )
}

/// A `/v1/completions` body.
pub fn parse_completion(
    body: &[u8],
    defaults: &RequestDefaults,
    model_id: &str,
) -> Result<JobSpec, ApiError> {
    let body = object(body)?;
    let common: Common = read(&body, "")?;
    let prompt: OneOrMany = match body.get("prompt") {
        Some(p) => read(p, "prompt")?,
        None => {
            return Err(ApiError::invalid(
                "prompt",
                "the request has no `prompt`: give the text to continue",
            ))
        }
    };
    let prompt = match prompt {
        OneOrMany::One(p) => p,
        OneOrMany::Many(mut list) if list.len() == 1 => list.remove(0),
        OneOrMany::Many(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "give one prompt per request (a list of several is not supported)",
            ))
        }
    };
    if common.echo == Some(true) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if common.suffix.is_some() {
        return Err(ApiError::invalid(
            "suffix",
            "suffix (insertion) is not supported",
        ));
    }
    finish(
        Endpoint::Completion,
        Input::Text(prompt),
        common,
        defaults,
        model_id,
    )
}

fn message(m: Message) -> Result<ChatMessage, ApiError> {
    let role = match m.role.as_str() {
        "system" | "user" | "assistant" => m.role,
        // OpenAI's newer name for the system role.
        "developer" => "system".to_string(),
        other => {
            return Err(ApiError::invalid(
                "messages",
                format!("message role {other:?} is not supported: use system, user or assistant"),
            ))
        }
    };
    let content = match m.content {
        None => String::new(),
        Some(Content::Text(t)) => t,
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            "messages",
                            format!("content parts of type {kind:?} are not supported: this model reads text"),
                        ))
                    }
                }
            }
            text
        }
    };
    Ok(ChatMessage { role, content })
}

/// The common fields checked against what the engine can do, with the defaults filled in.
fn finish(
    endpoint: Endpoint,
    input: Input,
    c: Common,
    d: &RequestDefaults,
    model_id: &str,
) -> Result<JobSpec, ApiError> {
    if let Some(model) = c.model.as_deref().filter(|m| *m != model_id) {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            format!("the model {model:?} does not exist on this server: it serves {model_id:?}"),
        )
        .with_code("model_not_found"));
    }
    if let Some((field, why)) = c.unsupported() {
        return Err(ApiError::invalid(
            field,
            format!("{field}: {why} by this server"),
        ));
    }
    if c.n.is_some_and(|n| n != 1) || c.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "n",
            "one choice per request: n must be 1",
        ));
    }
    if c.logprobs
        .as_ref()
        .is_some_and(|v| !v.is_null() && *v != serde_json::Value::Bool(false))
    {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => d.max_tokens,
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };
    let sampling = sampling(&c, d)?;
    let stop = stops(c.stop)?;
    Ok(JobSpec {
        endpoint,
        input,
        max_tokens,
        sampling,
        stop,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The request's sampling, checked against what the engine allows.
fn sampling(c: &Common, d: &RequestDefaults) -> Result<SamplingParams, ApiError> {
    let temperature = c.temperature.unwrap_or(d.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!(
                "temperature must be between 0 and 2, got {}",
                crate::units::format_number(temperature)
            ),
        ));
    }
    if let (Some(why), true) = (d.greedy_only, temperature > 0.0) {
        return Err(ApiError::invalid(
            "temperature",
            format!("{why}: send temperature 0 (or leave it out), got {temperature}"),
        ));
    }
    let top_p = c.top_p.unwrap_or(d.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!(
                "top_p must be in (0, 1], got {}",
                crate::units::format_number(top_p)
            ),
        ));
    }
    Ok(SamplingParams {
        temperature,
        top_k: d.top_k,
        top_p,
        // Without a seed every request draws its own.
        seed: c.seed.map_or_else(fresh_seed, |s| s as u64),
    })
}

/// `stop`: one string or up to [`MAX_STOPS`].
fn stops(stop: Option<OneOrMany>) -> Result<Vec<String>, ApiError> {
    let stop = match stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS
        || stop
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "stop takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_BYTES} bytes"
            ),
        ));
    }
    Ok(stop)
}

fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    now ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> RequestDefaults {
        RequestDefaults {
            max_tokens: 16,
            temperature: 0.0,
            top_k: 40,
            top_p: 1.0,
            greedy_only: None,
        }
    }

    #[test]
    fn chat_fields_and_defaults() {
        let body = br#"{"model":"m","messages":[{"role":"developer","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hi"}]}],"stop":"\n","seed":7,"stream":true,
            "stream_options":{"include_usage":true}}"#;
        let spec = parse_chat(body, &defaults(), "m").unwrap();
        let Input::Chat(m) = &spec.input else {
            panic!("chat input")
        };
        assert_eq!(
            (m[0].role.as_str(), m[1].content.as_str()),
            ("system", "hi")
        );
        assert_eq!((spec.max_tokens, spec.sampling.seed), (16, 7));
        assert_eq!(spec.stop, vec!["\n".to_string()]);
        assert!(spec.stream && spec.include_usage);
    }

    #[test]
    fn refusals_name_the_field() {
        let d = defaults();
        let err = |body: &[u8]| parse_completion(body, &d, "m").unwrap_err();
        assert_eq!(err(br#"{"prompt":"x","n":2}"#).param, Some("n"));
        assert_eq!(
            err(br#"{"prompt":"x","max_tokens":0}"#).param,
            Some("max_tokens")
        );
        assert_eq!(
            err(br#"{"prompt":"x","stop":["a","b","c","d","e"]}"#).param,
            Some("stop")
        );
        assert_eq!(
            err(br#"{"prompt":"x","model":"other"}"#).status,
            axum::http::StatusCode::NOT_FOUND
        );
        assert_eq!(
            err(br#"{"prompt":"x""#).status,
            axum::http::StatusCode::BAD_REQUEST
        );
        assert_eq!(err(br#"{"prompt":["a","b"]}"#).param, Some("prompt"));
        assert_eq!(
            err(br#"{"prompt":"x","tools":[{"type":"function"}]}"#).param,
            Some("tools")
        );
        assert_eq!(
            err(br#"{"prompt":"x","response_format":{"type":"json_object"}}"#).param,
            Some("response_format")
        );
        assert_eq!(
            err(br#"{"prompt":"x","presence_penalty":0.5}"#).param,
            Some("presence_penalty")
        );
        let ok = br#"{"prompt":"x","stream":null,"tools":[],"tool_choice":"none","response_format":{"type":"text"},"frequency_penalty":0}"#;
        assert!(
            parse_completion(ok, &d, "m").is_ok(),
            "defaults of unsupported fields are accepted"
        );
        let greedy = RequestDefaults {
            greedy_only: Some("Sirius decodes greedily"),
            ..defaults()
        };
        let e = parse_completion(br#"{"prompt":"x","temperature":0.5}"#, &greedy, "m").unwrap_err();
        assert!(
            e.message.contains("Sirius decodes greedily"),
            "{}",
            e.message
        );
        assert!(parse_completion(br#"{"prompt":"x"}"#, &greedy, "m").is_ok());
    }
}
