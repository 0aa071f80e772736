//! Malformed request bodies sent to a running `serve` (the tiny model on a loopback port):
//! each a 4xx whose error message is one line naming the field at fault, and the server
//! still healthy afterwards.

use std::io::Write;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::serve::{http_request, spawn_serve};
use crate::common::{write_model, TinySpec};
use crate::harness::clean_message;

struct Server {
    child: Child,
    port: u16,
    stderr: mpsc::Receiver<String>,
}

impl Server {
    fn start(model: &std::path::Path) -> Server {
        let extra = ["--max-tokens", "2", "--temperature", "0"];
        let (child, port, rx) = spawn_serve(model, &extra, false, Duration::from_secs(60));
        let server = Server {
            child,
            port,
            stderr: rx,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.request("GET", "/health", "").0 != 200 {
            assert!(Instant::now() < deadline, "the model never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// (status, body) of one HTTP/1.1 request (0 when the connection fails).
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http_request(self.port, method, path, body, Some(Duration::from_secs(60)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CHAT: &str = "/v1/chat/completions";
const TEXT: &str = "/v1/completions";

/// (what, endpoint, body, status, words the message must hold).
type Request = (
    &'static str,
    &'static str,
    String,
    u16,
    &'static [&'static str],
);

fn chat(extra: &str) -> String {
    format!(r#"{{"messages":[{{"role":"user","content":"w3 w4"}}]{extra}}}"#)
}

fn text(extra: &str) -> String {
    format!(r#"{{"prompt":"w3 w4"{extra}}}"#)
}

fn requests() -> Vec<Request> {
    vec![
        (
            "not JSON",
            CHAT,
            "{\"messages\":".into(),
            400,
            &["not valid JSON"],
        ),
        ("empty body", CHAT, String::new(), 400, &["not valid JSON"]),
        ("a JSON list", CHAT, "[1,2]".into(), 400, &["JSON object"]),
        (
            "a JSON string",
            TEXT,
            "\"hello\"".into(),
            400,
            &["JSON object"],
        ),
        ("no messages", CHAT, "{}".into(), 400, &["messages"]),
        (
            "messages not a list",
            CHAT,
            r#"{"messages":"hi"}"#.into(),
            400,
            &["messages"],
        ),
        (
            "no messages in the list",
            CHAT,
            r#"{"messages":[]}"#.into(),
            400,
            &["messages"],
        ),
        (
            "a message without a role",
            CHAT,
            r#"{"messages":[{"content":"hi"}]}"#.into(),
            400,
            &["messages[0]", "role"],
        ),
        (
            "a role that is a number",
            CHAT,
            r#"{"messages":[{"role":7,"content":"hi"}]}"#.into(),
            400,
            &["messages[0].role"],
        ),
        (
            "an unknown role",
            CHAT,
            r#"{"messages":[{"role":"wizard","content":"hi"}]}"#.into(),
            400,
            &["wizard"],
        ),
        (
            "a tool role",
            CHAT,
            r#"{"messages":[{"role":"tool","content":"hi"}]}"#.into(),
            400,
            &["tool"],
        ),
        (
            "content a number",
            CHAT,
            r#"{"messages":[{"role":"user","content":5}]}"#.into(),
            400,
            &["messages[0].content"],
        ),
        (
            "an image part",
            CHAT,
            r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#
                .into(),
            400,
            &["image_url"],
        ),
        (
            "a part without a type",
            CHAT,
            r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#.into(),
            400,
            &["messages[0].content"],
        ),
        (
            "max_tokens negative",
            CHAT,
            chat(r#","max_tokens":-1"#),
            400,
            &["max_tokens", "-1"],
        ),
        (
            "max_tokens 0",
            CHAT,
            chat(r#","max_tokens":0"#),
            400,
            &["max_tokens"],
        ),
        (
            "max_tokens a string",
            CHAT,
            chat(r#","max_tokens":"10""#),
            400,
            &["max_tokens", "\"10\""],
        ),
        (
            "max_tokens a fraction",
            TEXT,
            text(r#","max_tokens":2.5"#),
            400,
            &["max_tokens"],
        ),
        (
            "max_completion_tokens negative",
            CHAT,
            chat(r#","max_completion_tokens":-3"#),
            400,
            &["max_completion_tokens"],
        ),
        (
            "temperature negative",
            CHAT,
            chat(r#","temperature":-1"#),
            400,
            &["temperature"],
        ),
        (
            "temperature 5",
            CHAT,
            chat(r#","temperature":5"#),
            400,
            &["temperature"],
        ),
        (
            "temperature a string",
            CHAT,
            chat(r#","temperature":"hot""#),
            400,
            &["temperature"],
        ),
        ("top_p 0", TEXT, text(r#","top_p":0"#), 400, &["top_p"]),
        ("top_p 2", TEXT, text(r#","top_p":2"#), 400, &["top_p"]),
        ("n 2", CHAT, chat(r#","n":2"#), 400, &["n must be 1"]),
        (
            "n huge",
            CHAT,
            chat(r#","n":1000000000000"#),
            400,
            &["n must be 1"],
        ),
        ("n negative", CHAT, chat(r#","n":-1"#), 400, &["`n`"]),
        (
            "best_of 3",
            TEXT,
            text(r#","best_of":3"#),
            400,
            &["n must be 1"],
        ),
        ("stop a number", CHAT, chat(r#","stop":5"#), 400, &["stop"]),
        (
            "stop an empty string",
            CHAT,
            chat(r#","stop":"""#),
            400,
            &["stop"],
        ),
        (
            "stop five strings",
            CHAT,
            chat(r#","stop":["a","b","c","d","e"]"#),
            400,
            &["stop"],
        ),
        (
            "stop a list with a number",
            CHAT,
            chat(r#","stop":["a",1]"#),
            400,
            &["stop"],
        ),
        (
            "stop too long",
            TEXT,
            text(&format!(r#","stop":"{}""#, "x".repeat(2000))),
            400,
            &["stop"],
        ),
        (
            "seed a string",
            CHAT,
            chat(r#","seed":"abc""#),
            400,
            &["seed"],
        ),
        (
            "stream a string",
            CHAT,
            chat(r#","stream":"yes""#),
            400,
            &["stream"],
        ),
        (
            "stream_options a list",
            CHAT,
            chat(r#","stream_options":[1]"#),
            400,
            &["stream_options"],
        ),
        (
            "model of another server",
            CHAT,
            chat(r#","model":"gpt-9""#),
            404,
            &["gpt-9"],
        ),
        (
            "model a number",
            CHAT,
            chat(r#","model":3"#),
            400,
            &["model"],
        ),
        (
            "tools asked for",
            CHAT,
            chat(r#","tools":[{"type":"function"}]"#),
            400,
            &["tools"],
        ),
        (
            "JSON mode asked for",
            CHAT,
            chat(r#","response_format":{"type":"json_object"}"#),
            400,
            &["response_format"],
        ),
        (
            "a presence penalty",
            CHAT,
            chat(r#","presence_penalty":0.5"#),
            400,
            &["presence_penalty"],
        ),
        (
            "logprobs asked for",
            CHAT,
            chat(r#","logprobs":true"#),
            400,
            &["logprobs"],
        ),
        ("no prompt", TEXT, "{}".into(), 400, &["prompt"]),
        (
            "prompt a number",
            TEXT,
            r#"{"prompt":5}"#.into(),
            400,
            &["prompt"],
        ),
        (
            "two prompts",
            TEXT,
            r#"{"prompt":["a","b"]}"#.into(),
            400,
            &["prompt"],
        ),
        (
            "echo asked for",
            TEXT,
            text(r#","echo":true"#),
            400,
            &["echo"],
        ),
        ("a suffix", TEXT, text(r#","suffix":"x""#), 400, &["suffix"]),
        (
            "a prompt longer than the context",
            TEXT,
            format!(r#"{{"prompt":"{}"}}"#, "w3 ".repeat(200)),
            413,
            &["context"],
        ),
    ]
}

#[test]
fn bad_request_bodies_are_4xx_naming_the_field() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let model = write_model(&tmp.path().join("model"), &TinySpec::default(), 1);
    let server = Server::start(&model);
    let cases = requests();
    let mut failures = Vec::new();
    for (what, endpoint, body, status, needles) in &cases {
        let (got, answer) = server.request("POST", endpoint, body);
        let message = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_default();
        let needles: Vec<String> = needles.iter().map(|n| n.to_string()).collect();
        if got != *status {
            failures.push(format!(
                "  {what}: status {got}, expected {status}: {answer}"
            ));
        } else if let Err(e) = clean_message(&message, &needles) {
            failures.push(format!("  {what}: {e}"));
        }
    }
    assert_eq!(
        server.request("GET", "/health", "").0,
        200,
        "the server is still healthy"
    );
    let log: Vec<String> = server.stderr.try_iter().collect();
    assert!(
        !log.iter().any(|l| l.contains("panicked")),
        "the server panicked: {log:?}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "requests: {} cases, {} failed",
        cases.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests were not refused cleanly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
