//! Structure-aware JSON mutations: a valid document changed field by field (a value set to an
//! edge number, string or type, a key removed, renamed or added from the format's own keys,
//! array items dropped or repeated, a subtree copied elsewhere), numbers JSON can write but
//! `f64`/`u64` cannot hold (`1e400`, `18446744073709551616`), then sometimes byte mutations of
//! the text.

use serde_json::{json, Map, Value};

use super::bytes;
use super::Rng;

/// Texts put in place of a value that no `Value` can hold.
const RAW: [&str; 10] = [
    "1e400",
    "-1e400",
    "1e-400",
    "18446744073709551616",
    "-9223372036854775809",
    "NaN",
    "Infinity",
    "-0",
    "0.0000000000000000000000000000000000000000000001",
    "123456789012345678901234567890",
];

fn edge_value(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 | 1 => edge_number(rng),
        2 => edge_string(rng),
        3 => Value::String(format!("\u{1}RAW{}\u{1}", rng.below(RAW.len()))),
        _ => [
            Value::Null,
            json!(true),
            json!(false),
            json!([]),
            json!({}),
            json!([0]),
            json!([1, 2, 3]),
            json!({"a": 1}),
            json!([[]]),
        ][rng.below(9)]
        .clone(),
    }
}

fn edge_number(rng: &mut Rng) -> Value {
    match rng.below(3) {
        0 => json!(*rng.pick(&bytes::EDGE_INTS)),
        1 => json!(*rng.pick(&[
            -1i64,
            -2,
            -1024,
            i64::MIN,
            i32::MIN as i64,
            3,
            7,
            31,
            33,
            4096
        ])),
        _ => json!(*rng.pick(&[
            0.0f64,
            -0.0,
            0.5,
            -0.5,
            1e-45,
            1e-300,
            f64::MIN_POSITIVE,
            3.4e38,
            3.5e38,
            1e308,
            -1e308,
            1.0000001,
            65504.0,
            65520.0,
        ])),
    }
}

fn edge_string(rng: &mut Rng) -> Value {
    let s = match rng.below(10) {
        0 => String::new(),
        1 => "a".repeat(1 + rng.below(20_000)),
        2 => "\u{0}".into(),
        3 => "é\u{FFFD}\u{10FFFF}".into(),
        4 => "<|im_end|>".into(),
        5 => "{{ messages }}{% for".into(),
        6 => "../../etc/passwd".into(),
        7 => "/abs/path".into(),
        8 => " ".into(),
        _ => "LlamaForCausalLM".into(),
    };
    Value::String(s)
}

#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn paths(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                here.push(Step::Key(k.clone()));
                paths(child, here, out);
                here.pop();
            }
        }
        // Long arrays (vocabularies): a few items stand for the rest.
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate().take(8) {
                here.push(Step::Index(i));
                paths(child, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn at_mut<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |node, step| match step {
        Step::Key(k) => node.get_mut(k.as_str()),
        Step::Index(i) => node.get_mut(*i),
    })
}

/// One structural mutation of `doc`; `keys` are field names of the format (added with
/// edge values, so unusual but meaningful fields appear).
pub fn mutate_tree(rng: &mut Rng, doc: &mut Value, keys: &[&str]) {
    let mut all = Vec::new();
    paths(doc, &mut Vec::new(), &mut all);
    let path = rng.pick(&all).clone();
    let donor = at_mut(doc, &rng.pick(&all).clone()).map(|v| v.clone());
    let Some(node) = at_mut(doc, &path) else {
        return;
    };
    let kind = rng.below(6);
    match node {
        Value::Object(m) if kind == 0 && !m.is_empty() => {
            let k = m
                .keys()
                .nth(rng.below(m.len()))
                .cloned()
                .unwrap_or_default();
            let v = m.remove(&k).unwrap_or(Value::Null);
            if rng.one_in(2) {
                m.insert(format!("{k}{}", rng.pick(&["_", "s", "X", " "])), v);
            }
        }
        Value::Object(m) if kind == 1 && !keys.is_empty() => {
            let v = match donor {
                Some(d) if rng.one_in(2) => d,
                _ => edge_value(rng),
            };
            m.insert(rng.pick(keys).to_string(), v);
        }
        Value::Array(a) if kind <= 1 && !a.is_empty() => {
            let i = rng.below(a.len());
            if rng.one_in(2) {
                a.remove(i);
            } else {
                let v = a[i].clone();
                a.insert(i, v);
            }
        }
        Value::Number(n) if kind == 2 => {
            let x = n.as_f64().unwrap_or(0.0);
            *node = match rng.below(5) {
                0 => json!(x + 1.0),
                1 => json!(x - 1.0),
                2 => json!(-x),
                3 => json!(x * 1024.0),
                _ => json!(x + 0.5),
            };
        }
        _ if kind == 3 => *node = donor.unwrap_or(Value::Null),
        _ => *node = edge_value(rng),
    }
}

/// `doc` as text (compact or pretty), with the raw-number markers substituted.
pub fn to_text(rng: &mut Rng, doc: &Value) -> Vec<u8> {
    let text = if rng.one_in(4) {
        serde_json::to_string_pretty(doc)
    } else {
        serde_json::to_string(doc)
    }
    .unwrap_or_default();
    if !text.contains("\\u0001RAW") {
        return text.into_bytes();
    }
    let mut out = text;
    for (i, raw) in RAW.iter().enumerate() {
        out = out.replace(&format!("\"\\u0001RAW{i}\\u0001\""), raw);
    }
    out.into_bytes()
}

/// A mutated document: usually one to three structural changes of `seed`, sometimes followed
/// by byte mutations of its text, sometimes byte mutations alone, rarely random bytes.
pub fn mutate(rng: &mut Rng, seed: &Value, keys: &[&str]) -> Vec<u8> {
    let mut doc = seed.clone();
    let roll = rng.below(20);
    if roll == 0 {
        return bytes::random(rng);
    }
    if roll >= 3 {
        for _ in 0..1 + rng.below(3) {
            mutate_tree(rng, &mut doc, keys);
        }
    }
    let text = to_text(rng, &doc);
    if roll < 3 || rng.one_in(6) {
        return bytes::mutate(rng, &text, &[], &[]);
    }
    text
}

/// An object's fields, for building documents in targets.
pub fn object(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}
