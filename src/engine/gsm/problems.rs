//! GSM8K-style problems: the JSONL data, the few-shot prompt, and the final number of an
//! answer, compared in a canonical form.

use crate::error::{Error, Result};

/// One problem of a data file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 1-based line of the file.
    pub line: usize,
    pub question: String,
    pub answer: String,
    /// The reference's final number, canonical (see [`canonical_number`]).
    pub target: String,
}

/// Parses a JSONL data file. `source` names the file in errors ("--data path"), which say the
/// line and what is wrong, on one line.
pub fn parse_problems(source: &str, text: &str) -> Result<Vec<Problem>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let err = |what: String| line_error(source, n, what);
        let object = json_object(source, n, line)?;
        let question = match object.get("question") {
            Some(serde_json::Value::String(q)) if !q.trim().is_empty() => q.trim().to_string(),
            Some(_) => return Err(err("\"question\" must be a non-empty string".into())),
            None => return Err(err("no \"question\"".into())),
        };
        let answer = match object.get("answer") {
            Some(a) => answer_text(a)
                .ok_or_else(|| err("\"answer\" must be a string or a number".into()))?,
            None => return Err(err("no \"answer\"".into())),
        };
        let target = final_answer(&answer)
            .ok_or_else(|| err(format!("the answer {answer:?} has no number")))?;
        out.push(Problem {
            line: n,
            question,
            answer,
            target,
        });
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument(format!("{source}: no problems")));
    }
    Ok(out)
}

/// An error about line `n` of `source` (a file as the user named it), on one line.
pub(crate) fn line_error(source: &str, n: usize, what: String) -> Error {
    Error::InvalidArgument(format!("{source}: line {n}: {what}"))
}

/// Line `n` of a JSONL file, which must hold one JSON object.
pub(crate) fn json_object(
    source: &str,
    n: usize,
    line: &str,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
        line_error(
            source,
            n,
            format!("not valid JSON ({e}); expected one object per line"),
        )
    })?;
    match value {
        serde_json::Value::Object(object) => Ok(object),
        _ => Err(line_error(source, n, "not a JSON object".into())),
    }
}

/// A worked answer as text: a string (trimmed) or a number.
pub(crate) fn answer_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(a) => Some(a.trim().to_string()),
        serde_json::Value::Number(a) => Some(a.to_string()),
        _ => None,
    }
}

/// The few-shot prompt for `question`.
pub fn few_shot_prompt(shots: &[Problem], question: &str) -> String {
    let mut s = String::new();
    for shot in shots {
        s.push_str("Question: ");
        s.push_str(&shot.question);
        s.push_str("\nAnswer: ");
        s.push_str(&shot.answer);
        s.push_str("\n\n");
    }
    s.push_str("Question: ");
    s.push_str(question.trim());
    s.push_str("\nAnswer:");
    s
}

/// True once the text has a complete `#### N` line: a `####`, a digit after it, then a newline.
pub fn answer_complete(text: &str) -> bool {
    text.find("####").is_some_and(|at| {
        let rest = &text[at + 4..];
        rest.find(|c: char| c.is_ascii_digit())
            .is_some_and(|d| rest[d..].contains('\n'))
    })
}

/// The final number of an answer: the first number after the first `####` that is followed
/// by one, otherwise the last number in the text. Canonical (see [`canonical_number`]).
pub fn final_answer(text: &str) -> Option<String> {
    let mut from = 0;
    while let Some(at) = text[from..].find("####") {
        let after = from + at + 4;
        if let Some(n) = numbers(&text[after..]).into_iter().next() {
            return Some(n);
        }
        from = after;
    }
    numbers(text).pop()
}

/// Canonical form of one number written as text ("$1,234.50" -> "1234.5", "12.0" -> "12",
/// "-0" -> "0"); None when `raw` holds no number or more than one.
pub fn canonical_number(raw: &str) -> Option<String> {
    let mut all = numbers(raw);
    (all.len() == 1).then(|| all.remove(0))
}

/// Every number in `text`, in order, canonical. A number is digits with optional thousands
/// groups (`1,234`: a comma then exactly three digits) and an optional fraction (`.5`; a
/// trailing `.` ends a sentence). A `-` directly before it (or before its `$`) is a sign
/// unless it follows a letter, a digit or `)` (then it is a minus: `160-48`).
fn numbers(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let digit = |k: usize| k < b.len() && b[k].is_ascii_digit();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let mut j = i;
        if j > 0 && b[j - 1] == b'$' {
            j -= 1;
        }
        let negative = j > 0
            && b[j - 1] == b'-'
            && (j == 1 || !(b[j - 2].is_ascii_alphanumeric() || b[j - 2] == b')'));
        let mut k = i;
        while digit(k) {
            k += 1;
        }
        let mut int = text[i..k].to_string();
        while k < b.len() && b[k] == b',' && (1..=3).all(|d| digit(k + d)) && !digit(k + 4) {
            int.push_str(&text[k + 1..k + 4]);
            k += 4;
        }
        let mut frac = "";
        if k < b.len() && b[k] == b'.' && digit(k + 1) {
            let start = k + 1;
            k = start;
            while digit(k) {
                k += 1;
            }
            frac = &text[start..k];
        }
        out.push(canonical(negative, &int, frac));
        i = k;
    }
    out
}

fn canonical(negative: bool, int: &str, frac: &str) -> String {
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let mut s = if int.is_empty() { "0" } else { int }.to_string();
    if !frac.is_empty() {
        s.push('.');
        s.push_str(frac);
    }
    if negative && s != "0" {
        s.insert(0, '-');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fa(s: &str) -> Option<String> {
        final_answer(s)
    }

    #[test]
    fn final_answer_after_the_marker() {
        assert_eq!(fa("3 + 4 = 7\n#### 7").as_deref(), Some("7"));
        // The first number after the marker, not the last of the text.
        assert_eq!(
            fa("so 5 apples\n#### 12 apples, 3 left").as_deref(),
            Some("12")
        );
        assert_eq!(fa("#### $1,234.50").as_deref(), Some("1234.5"));
        assert_eq!(fa("####-3").as_deref(), Some("-3"));
        // A marker with no number after it: the next marker or the last number.
        assert_eq!(fa("#### none\n#### 9").as_deref(), Some("9"));
        assert_eq!(fa("it is 4 then 6\n####").as_deref(), Some("6"));
    }

    #[test]
    fn final_answer_without_marker_is_the_last_number() {
        assert_eq!(
            fa("160-48=112 emails, times 5 is 560.").as_deref(),
            Some("560")
        );
        assert_eq!(fa("The answer is 12.0.").as_deref(), Some("12"));
        assert_eq!(fa("She has $-5 left").as_deref(), Some("-5"));
        assert_eq!(fa("no digits here"), None);
        assert_eq!(fa(""), None);
    }

    #[test]
    fn numbers_canonical_forms() {
        assert_eq!(canonical_number("1,234").as_deref(), Some("1234"));
        assert_eq!(canonical_number("$1,234,567").as_deref(), Some("1234567"));
        assert_eq!(canonical_number("12.0").as_deref(), Some("12"));
        assert_eq!(canonical_number("12.50").as_deref(), Some("12.5"));
        assert_eq!(canonical_number("0.5").as_deref(), Some("0.5"));
        assert_eq!(canonical_number("007").as_deref(), Some("7"));
        assert_eq!(canonical_number("-0.0").as_deref(), Some("0"));
        assert_eq!(canonical_number("-42").as_deref(), Some("-42"));
        assert_eq!(canonical_number("-$42").as_deref(), Some("-42"));
        assert_eq!(canonical_number("(-3)").as_deref(), Some("-3"));
        // A minus between operands is not a sign.
        assert_eq!(numbers("160-48"), vec!["160", "48"]);
        assert_eq!(numbers("x-2"), vec!["2"]);
        // A comma not followed by exactly three digits separates numbers.
        assert_eq!(numbers("3,4 and 1,2345"), vec!["3", "4", "1", "2345"]);
        assert_eq!(numbers("1,000."), vec!["1000"]);
        // A sentence-ending dot is not a fraction.
        assert_eq!(numbers("was 7. Then 8"), vec!["7", "8"]);
        assert_eq!(canonical_number("3 and 4"), None);
        assert_eq!(canonical_number("none"), None);
        assert_eq!(fa("12").as_deref(), fa("#### 12.00").as_deref());
        assert_ne!(fa("#### 12.01"), fa("#### 12"));
    }

    #[test]
    fn answer_complete_needs_a_number_and_a_newline() {
        assert!(!answer_complete("so 7\n"));
        assert!(!answer_complete("#### 7"));
        assert!(!answer_complete("####\n"));
        assert!(!answer_complete("#### \n"));
        assert!(answer_complete("3+4=7\n#### 7\n"));
        assert!(answer_complete("#### 1,234\n\nQuestion"));
    }

    #[test]
    fn parse_problems_reads_jsonl_and_names_bad_lines() {
        let text = "{\"question\": \" Q1 \", \"answer\": \"1+1=2\\n#### 2\"}\n\n{\"question\": \"Q2\", \"answer\": 1234}\n";
        let p = parse_problems("--data f.jsonl", text).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].line, p[0].question.as_str()), (1, "Q1"));
        assert_eq!(p[0].target, "2");
        assert_eq!((p[1].line, p[1].target.as_str()), (3, "1234"));
        for (bad, needle) in [
            ("{\"question\": \"Q\"", "line 2: not valid JSON"),
            ("[1, 2]", "line 2: not a JSON object"),
            ("{\"answer\": \"2\"}", "line 2: no \"question\""),
            ("{\"question\": \"Q\"}", "line 2: no \"answer\""),
            (
                "{\"question\": \"Q\", \"answer\": \"two\"}",
                "line 2: the answer",
            ),
            (
                "{\"question\": 3, \"answer\": \"2\"}",
                "line 2: \"question\"",
            ),
        ] {
            let text = format!("{{\"question\": \"Q\", \"answer\": \"1\"}}\n{bad}\n");
            let e = parse_problems("--data f.jsonl", &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--data f.jsonl: ") && e.contains(needle), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        assert!(parse_problems("--data f", "\n \n").is_err());
    }

    #[test]
    fn prompt_layout() {
        let shot = Problem {
            line: 1,
            question: "Q1?".into(),
            answer: "1+1=2\n#### 2".into(),
            target: "2".into(),
        };
        assert_eq!(
            few_shot_prompt(&[shot], "Q2?"),
            "Question: Q1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: Q2?\nAnswer:"
        );
        assert_eq!(few_shot_prompt(&[], " Q "), "Question: Q\nAnswer:");
    }
}
