//! Runs a table of command lines and checks that each fails cleanly.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One command line that must fail, and the words its one-line error must contain.
pub struct Case {
    pub what: String,
    pub args: Vec<String>,
    pub needles: Vec<String>,
}

impl Case {
    pub fn new(what: impl Into<String>, args: &[&str], needles: &[&str]) -> Case {
        Case {
            what: what.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            needles: needles.iter().map(|n| n.to_string()).collect(),
        }
    }
}

/// `run -m MODEL --prompt ... --max-tokens 1 --temperature 0 --no-fetch` and `extra`.
pub fn run_args(model: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["run", "-m", &model.to_string_lossy(), "--no-fetch"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    if !extra
        .iter()
        .any(|a| *a == "--prompt" || *a == "--prompt-file")
    {
        args.extend(["--prompt".into(), "w3 w4".into()]);
    }
    args.extend(["--max-tokens".into(), "1".into()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The outcome of one case: `Err` says what was wrong.
pub fn check(case: &Case) -> Result<(), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sirius-offload"))
        .args(&case.args)
        .env_remove("SIRIUS_LOG")
        .env("SIRIUS_NO_FETCH", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the binary: {e}"))?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("still running after 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let err = reader.join().unwrap_or_default();
    let Some(code) = status.code() else {
        return Err(format!("ended by a signal ({status}); stderr: {err}"));
    };
    if code == 0 {
        return Err(format!("succeeded; stderr: {err}"));
    }
    clean_message(&err, &case.needles)
}

/// `Err` unless `message` is one line, without a panic, naming every needle.
pub fn clean_message(message: &str, needles: &[String]) -> Result<(), String> {
    if message.contains("panicked") {
        return Err(format!("panicked: {message}"));
    }
    let lines = message.trim().lines().count();
    if lines != 1 {
        return Err(format!("{lines} lines instead of one: {message}"));
    }
    match needles.iter().find(|n| !message.contains(n.as_str())) {
        Some(n) => Err(format!("does not name {n:?}: {message}")),
        None => Ok(()),
    }
}

/// Runs every case (two at a time), and fails listing each one that did not fail cleanly.
pub fn check_all(group: &str, cases: &[Case]) {
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let (left, right) = cases.split_at(cases.len() / 2);
        let a = s.spawn(|| left.iter().map(check).collect::<Vec<_>>());
        let b = s.spawn(|| right.iter().map(check).collect::<Vec<_>>());
        let mut all = a.join().unwrap_or_default();
        all.extend(b.join().unwrap_or_default());
        all
    });
    assert_eq!(results.len(), cases.len(), "{group}: a case runner died");
    let failures: Vec<String> = (cases.iter().zip(&results))
        .filter_map(|(c, r)| r.as_ref().err().map(|e| format!("  {}: {e}", c.what)))
        .collect();
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "{group}: {} cases, {} failed\n",
            cases.len(),
            failures.len()
        )
        .as_bytes(),
    );
    assert!(
        failures.is_empty(),
        "{group}: {} of {} cases did not fail cleanly:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
