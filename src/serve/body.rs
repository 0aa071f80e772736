//! Request bodies read a part at a time, so that a field of the wrong type is named with what
//! it must be (serde alone says "invalid type: integer `-1`, expected u64", or "data did not
//! match any variant of untagged enum", and names no field).

use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_path_to_error::Segment;

use crate::serve::error::ApiError;

/// The fields a client may send, with what each must be (the `param` of an error is one of
/// these names).
const FIELDS: [(&str, &str); 26] = [
    ("model", "the served model's name, a string"),
    (
        "messages",
        "a list of messages, each {\"role\": ..., \"content\": ...}",
    ),
    ("prompt", "a string (or a list of one string)"),
    ("max_tokens", "a whole number of at least 1"),
    ("max_completion_tokens", "a whole number of at least 1"),
    ("temperature", "a number from 0 to 2"),
    ("top_p", "a number above 0 and at most 1"),
    ("stop", "a string or a list of up to 4 strings"),
    ("seed", "an integer"),
    ("stream", "true or false"),
    (
        "stream_options",
        "an object such as {\"include_usage\": true}",
    ),
    ("n", "1"),
    ("logprobs", "false"),
    ("echo", "true or false"),
    ("best_of", "1"),
    ("suffix", "a string"),
    ("tools", "a list"),
    ("tool_choice", "\"none\""),
    ("functions", "a list"),
    ("response_format", "{\"type\": \"text\"}"),
    ("presence_penalty", "0"),
    ("frequency_penalty", "0"),
    ("logit_bias", "an object"),
    ("top_logprobs", "0"),
    ("role", "a role name: system, user or assistant"),
    (
        "content",
        "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
    ),
];

/// What the field at the end of `path` (`messages[0].role`) must be.
fn expected(path: &str) -> Option<&'static str> {
    let last = path.rsplit('.').next()?.split('[').next()?;
    let nested = [
        ("include_usage", "true or false"),
        ("type", "a part type name, e.g. \"text\""),
        ("text", "a string"),
    ];
    (FIELDS.iter().chain(&nested))
        .find(|(name, _)| *name == last)
        .map(|(_, what)| *what)
}

/// The top-level field `path` starts in, as a `param`.
fn param(path: &str) -> Option<&'static str> {
    let top = path.split(['.', '[']).next()?;
    FIELDS
        .iter()
        .find(|(name, _)| *name == top)
        .map(|(name, _)| *name)
}

/// The body as a JSON object.
pub(crate) fn object(body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(other) => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, got {}",
            short(&other)
        ))),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// `value` (the body, or its field `base`) as a `T`; an error names the field at fault.
pub(crate) fn read<T: DeserializeOwned>(value: &Value, base: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = base.to_string();
        let mut at = Some(value);
        for segment in e.path().iter() {
            match segment {
                Segment::Seq { index } => {
                    path.push_str(&format!("[{index}]"));
                    at = at.and_then(|v| v.get(index));
                }
                Segment::Map { key } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                    at = at.and_then(|v| v.get(key));
                }
                Segment::Enum { .. } | Segment::Unknown => {}
            }
        }
        let inner = e.into_inner().to_string();
        let message = match (expected(&path), at) {
            (Some(what), Some(found)) if !inner.starts_with("missing field") => {
                format!("`{path}` must be {what}, got {}", short(found))
            }
            _ if path.is_empty() => format!("the request body: {inner}"),
            _ => format!("`{path}`: {inner}"),
        };
        match param(&path) {
            Some(p) => ApiError::invalid(p, message),
            None => ApiError::bad_request(message),
        }
    })
}

/// A JSON value as written, cut short.
fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(40) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Body {
        max_tokens: Option<u64>,
        messages: Option<Vec<Msg>>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Msg {
        role: String,
    }

    #[test]
    fn names_the_field_and_what_it_must_be() {
        let v = object(br#"{"max_tokens":-1}"#).unwrap();
        let e = read::<Body>(&v, "").unwrap_err();
        assert_eq!(e.param, Some("max_tokens"));
        assert!(e.message.contains("at least 1, got -1"), "{}", e.message);
        let v = object(br#"{"messages":[{"role":"user"},{"role":7}]}"#).unwrap();
        let e = read::<Body>(&v, "").unwrap_err();
        assert_eq!(e.param, Some("messages"));
        assert!(e.message.contains("`messages[1].role`"), "{}", e.message);
        assert!(object(b"[1]").unwrap_err().message.contains("JSON object"));
    }
}
