//! `sirius-offload serve` driven by the official `openai` Python client (issue 16): the real
//! server on a loopback port with SmolLM2, plain, with Sirius and offloaded; the 32-client
//! load test; a full queue and clients that leave; SIGTERM; the interactive chat on a
//! pseudo-terminal; the card's one-line command. The Python sides live in tests/serve/ and
//! tools/serve-load.py.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::serve::{http_request, spawn_serve};
use common::{run_bin, smollm2_dir, stderr_of};

/// One server at a time: each test's timings (and the load test's minute) assume the CPU.
static ONE_SERVER: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_SERVER.lock().unwrap_or_else(|e| e.into_inner())
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Python 3 with the `openai` package, or false after printing why `what` is skipped (a
/// failure with SIRIUS_REQUIRE_MODELS=1, as in CI, which installs it).
fn python_with_openai(what: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let why =
            "python3 with the openai package is needed: pip install -r tools/requirements-test.txt";
        if std::env::var("SIRIUS_REQUIRE_MODELS").as_deref() == Ok("1") {
            panic!("SIRIUS_REQUIRE_MODELS=1 but {why}");
        }
        let _ = writeln!(std::io::stderr(), "SKIPPED ({what}): {why}");
    }
    ok
}

/// SmolLM2 and the Python client, or None after saying why not.
fn setup(what: &str) -> Option<PathBuf> {
    let dir = smollm2_dir(what)?;
    python_with_openai(what).then_some(dir)
}

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Starts `serve` on a free loopback port with `extra` options and waits until /health
    /// answers 200.
    fn start(model: &Path, extra: &[&str]) -> Server {
        let (child, port, _stderr) = spawn_serve(model, extra, true, Duration::from_secs(120));
        let server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(120);
        while server.get("/health").0 != 200 {
            assert!(Instant::now() < deadline, "the model never became ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// (status, body) of a raw HTTP/1.1 request (0 when the connection fails).
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http_request(self.port, method, path, body, None)
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path, "")
    }

    /// Runs `tests/serve/openai_suite.py --suite suite` against this server.
    fn suite(&self, suite: &str, api_key: Option<&str>) {
        let mut args = vec![
            "tests/serve/openai_suite.py".to_string(),
            "--base-url".into(),
            self.base_url(),
            "--model".into(),
            "smollm2".into(),
            "--suite".into(),
            suite.into(),
        ];
        if let Some(key) = api_key {
            args.extend(["--api-key".into(), key.into()]);
        }
        python(&args);
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs python3 with `args` in the repository root; its output is shown, a failure fails.
fn python(args: &[String]) -> String {
    let out = Command::new("python3")
        .args(args)
        .current_dir(root())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python3 {args:?} failed");
    stdout
}

#[test]
fn openai_client_against_the_plain_server() {
    let Some(dir) = setup("serve: openai client") else {
        return;
    };
    let _one = one_at_a_time();
    let server = Server::start(
        &dir,
        &["--api-key", "test-key", "--served-model-name", "smollm2"],
    );
    server.suite("plain", Some("test-key"));
}

#[test]
fn openai_client_through_sirius_and_resident_mem() {
    let Some(dir) = setup("serve: Sirius and offloaded") else {
        return;
    };
    let _one = one_at_a_time();
    // A fixed window: `--period auto` follows timing, and the suite compares two runs' text.
    let sirius = [
        "--sirius",
        "--sparsity",
        "griffin",
        "--period",
        "4",
        "--served-model-name",
        "smollm2",
    ];
    Server::start(&dir, &sirius).suite("sirius", None);
    // The card's defaults: a budget alone serves Sirius with Griffin, greedy.
    let offloaded = [
        "--resident-mem",
        "161MB",
        "--period",
        "4",
        "--served-model-name",
        "smollm2",
    ];
    let server = Server::start(&dir, &offloaded);
    server.suite("offloaded", None);
    let (_, metrics) = server.get("/metrics");
    let streamed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sirius_streamed_bytes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        streamed > 0.0,
        "an offloaded server streams weights: {metrics}"
    );
}

/// Runs `suite` against a server started with `extra` options (`what` names it in skips).
fn suite_on_a_server(what: &str, extra: &[&str], suite: &str) {
    let Some(dir) = setup(what) else {
        return;
    };
    let _one = one_at_a_time();
    let args = [extra, &["--served-model-name", "smollm2"]].concat();
    Server::start(&dir, &args).suite(suite, None);
}

#[test]
fn a_prompt_over_the_context_is_413() {
    suite_on_a_server("serve: context", &["--ctx-size", "64"], "context");
}

#[test]
fn a_full_queue_answers_at_once_and_leaving_clients_free_the_engine() {
    suite_on_a_server("serve: queue", &["--max-queue", "1"], "queue");
}

#[test]
fn thirty_two_clients_times_four_requests_lose_nothing() {
    let Some(dir) = setup("serve: load test") else {
        return;
    };
    let _one = one_at_a_time();
    let server = Server::start(&dir, &["--served-model-name", "smollm2"]);
    let t = Instant::now();
    let url = server.base_url();
    let args = [
        "tools/serve-load.py",
        "--base-url",
        &url,
        "--model",
        "smollm2",
        "--check",
    ];
    let out = python(&args.map(String::from));
    assert!(out.contains("\"garbled\": 0"), "{out}");
    assert!(
        t.elapsed() < Duration::from_secs(90),
        "the load test took {:?}",
        t.elapsed()
    );
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_cleanly() {
    let Some(dir) = smollm2_dir("serve: SIGTERM") else {
        return;
    };
    let _one = one_at_a_time();
    let server = Server::start(&dir, &[]);
    let port = server.port;
    let body = r#"{"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0}"#;
    let in_flight = std::thread::spawn(move || {
        let s = Server {
            child: Command::new("true").spawn().unwrap(),
            port,
        };
        s.request("POST", "/v1/completions", body)
    });
    // Let the request reach the engine before the signal.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .get("/metrics")
        .1
        .contains("sirius_inter_token_latency_seconds_count")
        || server
            .get("/metrics")
            .1
            .contains("sirius_inter_token_latency_seconds_count 0")
    {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = server.terminate();
    let (code, answer) = in_flight.join().unwrap();
    assert_eq!(code, 200, "the request in flight finished: {answer}");
    assert!(answer.contains("\"completion_tokens\":48"), "{answer}");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn the_chat_on_a_terminal_keeps_history_and_ctrl_c_stops_an_answer() {
    let Some(dir) = smollm2_dir("chat on a terminal") else {
        return;
    };
    if Command::new("python3").arg("-V").output().is_err() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (chat on a terminal): no python3"
        );
        return;
    }
    let _one = one_at_a_time();
    let bin = env!("CARGO_BIN_EXE_sirius-offload");
    let args = ["tests/serve/chat_pty.py", bin, dir.to_str().unwrap()];
    python(&args.map(String::from));
}

#[test]
fn a_piped_prompt_is_read_from_stdin() {
    let Some(dir) = smollm2_dir("prompt from stdin") else {
        return;
    };
    let model = dir.to_str().unwrap();
    let common = [
        "-m",
        model,
        "--no-fetch",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "-q",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_sirius-offload"))
        .args(common)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Once upon a time")
        .unwrap();
    let piped = child.wait_with_output().unwrap();
    let given = run_bin(&[&common[..], &["-p", "Once upon a time"]].concat());
    assert!(piped.status.success() && given.status.success());
    assert!(!piped.stdout.is_empty());
    assert_eq!(piped.stdout, given.stdout, "the same prompt piped or given");
    // Nothing piped and no terminal: a clear error, not a hang.
    let empty = run_bin(&common);
    assert!(
        stderr_of(&empty).contains("standard input is empty"),
        "{}",
        stderr_of(&empty)
    );
}

#[test]
fn a_budget_alone_runs_sirius_with_griffin_greedily() {
    let Some(dir) = smollm2_dir("the card's defaults") else {
        return;
    };
    let stats = tempfile::NamedTempFile::new().unwrap();
    let s = stats.path().to_str().unwrap();
    let m = dir.to_str().unwrap();
    // The stats of `run -m M --resident-mem 161MB -p Hi` with `extra` options.
    let stats_of = |extra: &[&str]| -> serde_json::Value {
        let base = [
            "-m",
            m,
            "--resident-mem",
            "161MB",
            "-p",
            "Hi",
            "--max-tokens",
            "4",
        ];
        let out = run_bin(&[&base[..], extra, &["-q", "--stats-json", s]].concat());
        assert!(out.status.success(), "{}", stderr_of(&out));
        serde_json::from_str(&std::fs::read_to_string(s).unwrap()).unwrap()
    };
    let json = stats_of(&[]);
    assert_eq!(json["sparsity"], "griffin", "{json}");
    assert!(
        json["aal"].is_number() && json["streamed_bytes"].as_u64() > Some(0),
        "{json}"
    );
    // --sparsity none: the dense model offloaded (no Sirius report).
    let json = stats_of(&["--sparsity", "none"]);
    assert!(
        json["aal"].is_null() && json["sparsity"] == "none",
        "{json}"
    );
    // Sampling is refused by name on an offloaded run.
    let out = run_bin(&[
        "-m",
        m,
        "--resident-mem",
        "161MB",
        "-p",
        "Hi",
        "--temperature",
        "0.7",
    ]);
    assert!(
        stderr_of(&out).contains("decodes greedily"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn gpu_mem_alone_means_cuda_and_says_how_to_run_on_the_cpu() {
    let out = run_bin(&[
        "-m",
        "/nonexistent/model",
        "--no-fetch",
        "--gpu-mem",
        "24G",
        "-p",
        "Hi",
    ]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    if cfg!(feature = "cuda") {
        eprintln!("with CUDA built in, --gpu-mem 24G said: {err}");
    } else {
        assert!(
            err.contains("built without CUDA") && err.contains("--resident-mem 24G"),
            "{err}"
        );
    }
}

/// `serve` on `dir` with `extra`, expected to stop by itself: its exit status and stderr.
fn serve_until_it_stops(dir: &Path, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sirius-offload"))
        .args(["serve", "-m", dir.to_str().unwrap(), "--port", "0"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop after its engine failed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// A model that fails to load after the server listens: the server answers what was queued,
/// exits non-zero and prints the load error (no hang, no exit 0).
#[test]
fn an_engine_that_fails_to_load_ends_the_server_with_its_error() {
    let root = tempfile::tempdir().unwrap();
    let dir = common::write_model(&root.path().join("tiny"), &common::TinySpec::default(), 3);
    let (status, err) = serve_until_it_stops(&dir, &["--resident-mem", "1K"]);
    assert!(
        !status.success() && err.contains("minimum"),
        "a budget no request fits: {err}"
    );
    assert!(!err.contains("ready:"), "{err}");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let (status, err) = serve_until_it_stops(&dir, &[]);
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("error:") && err.contains("safetensors"),
        "{err}"
    );
}

#[test]
fn serve_option_errors_come_before_any_load() {
    for (extra, needle) in [
        (vec!["--max-queue", "0"], "--max-queue"),
        (
            vec!["--trace", "/tmp/t.json", "--resident-mem", "1G"],
            "--trace",
        ),
        (vec!["--temperature", "-1"], "temperature"),
        (vec!["--host", "no such host!"], "--host"),
        (vec!["--sirius", "--temperature", "0.5"], "--temperature 0"),
        (vec!["--max-tokens", "0"], "--max-tokens"),
        (vec!["--temperature", "7"], "between 0 and 2"),
        (
            vec!["--max-queue", "1000000000"],
            "--max-queue must be between",
        ),
    ] {
        let mut args = vec![
            "serve",
            "-m",
            "/nonexistent/model",
            "--no-fetch",
            "--port",
            "0",
        ];
        args.extend(extra);
        let out = run_bin(&args);
        let err = stderr_of(&out);
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(
            !err.contains("listening"),
            "{args:?} should fail before listening: {err}"
        );
    }
}
