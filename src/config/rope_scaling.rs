//! `rope_scaling` of a config.json: how RoPE frequencies are rescaled for long context. Every
//! number is checked: a nonsense value (a zero original context, a factor of 0) would not fail
//! later, it would quietly change every output.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::units::format_number;

/// How RoPE frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1/3.2 "llama3" scaling: low frequencies divided by `factor`, high ones kept,
    /// a smooth blend between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor` (all frequencies scaled alike).
    Linear { factor: f32 },
}

/// The largest `original_max_position_embeddings` taken (far above any real model's).
const MAX_ORIGINAL_CONTEXT: u64 = 1 << 24;

/// The largest scaling factor taken (Llama 3.1 uses 8, long-context variants tens).
const MAX_FACTOR: f64 = 1e4;

/// Parses `rope_scaling` (not null) of the config.json at `path`.
pub fn parse_rope_scaling(v: &Value, path: &Path) -> Result<RopeScaling> {
    let fail = |msg: String| Error::config(path, format!("rope_scaling: {msg}"));
    if !v.is_object() {
        return Err(fail(format!(
            "expected an object with a `rope_type`, found {}",
            short(v)
        )));
    }
    let kind = match v.get("rope_type").or_else(|| v.get("type")) {
        Some(Value::String(k)) => k.as_str(),
        None => return Err(fail("`rope_type` is missing (llama3 or linear)".into())),
        Some(other) => {
            return Err(fail(format!(
                "`rope_type` must be a name (llama3 or linear), found {}",
                short(other)
            )))
        }
    };
    let num = |key: &str, min_exclusive: f64, max: f64| -> Result<f64> {
        let x = v.get(key).ok_or_else(|| {
            fail(format!(
                "type {kind:?} needs a numeric `{key}`, which is missing"
            ))
        })?;
        match x.as_f64() {
            // Compared as the f32 the rotary tables use too: 1e-300 is 0 there.
            Some(n)
                if n.is_finite()
                    && n > min_exclusive
                    && n as f32 > min_exclusive as f32
                    && n <= max =>
            {
                Ok(n)
            }
            Some(n) => Err(fail(format!(
                "`{key}` must be above {min_exclusive} and at most {max}, found {}",
                format_number(n)
            ))),
            None => Err(fail(format!(
                "`{key}` must be a number, found {}",
                short(x)
            ))),
        }
    };
    match kind {
        "llama3" => {
            let factor = num("factor", 0.0, MAX_FACTOR)?;
            let low = num("low_freq_factor", 0.0, MAX_FACTOR)?;
            let high = num("high_freq_factor", 0.0, MAX_FACTOR)?;
            if high <= low {
                return Err(fail(format!(
                    "llama3 needs high_freq_factor above low_freq_factor, found {} and {}",
                    format_number(high),
                    format_number(low)
                )));
            }
            let original = original_context(v).map_err(fail)?;
            Ok(RopeScaling::Llama3 {
                factor: factor as f32,
                low_freq_factor: low as f32,
                high_freq_factor: high as f32,
                original_max_position_embeddings: original,
            })
        }
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor", 0.0, MAX_FACTOR)? as f32,
        }),
        "default" => Ok(RopeScaling::Linear { factor: 1.0 }),
        other => Err(fail(format!(
            "type {other:?} is not supported (supported: llama3, linear)"
        ))),
    }
}

/// `original_max_position_embeddings`: a whole number of positions, at least 1.
fn original_context(v: &Value) -> Result<usize, String> {
    const KEY: &str = "original_max_position_embeddings";
    match v.get(KEY) {
        None => Err(format!("llama3 needs `{KEY}`, which is missing")),
        Some(x) => match x.as_u64() {
            Some(n) if (1..=MAX_ORIGINAL_CONTEXT).contains(&n) => Ok(n as usize),
            _ => Err(format!(
                "`{KEY}` must be a whole number of positions from 1 to {MAX_ORIGINAL_CONTEXT}, found {}",
                short(x)
            )),
        },
    }
}

/// A JSON value as written, cut short.
pub(crate) fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(40) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<RopeScaling> {
        let v: Value = serde_json::from_str(json).unwrap();
        parse_rope_scaling(&v, Path::new("config.json"))
    }

    const LLAMA3: &str = r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192}"#;

    #[test]
    fn llama3_and_linear_parse() {
        assert!(matches!(
            parse(LLAMA3).unwrap(),
            RopeScaling::Llama3 { factor, original_max_position_embeddings: 8192, .. } if factor == 8.0
        ));
        assert_eq!(
            parse(r#"{"type":"linear","factor":2}"#).unwrap(),
            RopeScaling::Linear { factor: 2.0 }
        );
    }

    #[test]
    fn nonsense_is_refused_naming_the_key() {
        for (from, to, key) in [
            ("8192}", "0}", "original_max_position_embeddings"),
            ("8192}", "8192.5}", "original_max_position_embeddings"),
            ("8192}", "-1}", "original_max_position_embeddings"),
            ("\"factor\":8.0", "\"factor\":0", "factor"),
            ("\"factor\":8.0", "\"factor\":-2", "factor"),
            ("\"factor\":8.0", "\"factor\":\"8\"", "factor"),
            (
                "\"low_freq_factor\":1.0",
                "\"low_freq_factor\":4.0",
                "high_freq_factor",
            ),
            (
                "\"low_freq_factor\":1.0",
                "\"low_freq_factor\":0",
                "low_freq_factor",
            ),
            ("\"rope_type\":\"llama3\"", "\"rope_type\":\"yarn\"", "yarn"),
            ("\"rope_type\":\"llama3\",", "", "rope_type"),
        ] {
            let text = LLAMA3.replace(from, to);
            assert_ne!(text, LLAMA3, "{from}");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("rope_scaling"), "{err}");
        }
        assert!(parse("[1]").is_err());
    }
}
