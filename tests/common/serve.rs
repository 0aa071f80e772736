//! A real `serve` process on a free loopback port, for the suites that drive it over HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Starts `sirius-offload serve -m MODEL --no-fetch --port 0 EXTRA...` and waits up to `wait`
/// for the address it prints; returns the process, its port and its stderr lines (which are
/// also echoed, with its stdout, when `echo`).
pub fn spawn_serve(
    model: &Path,
    extra: &[&str],
    echo: bool,
    wait: Duration,
) -> (Child, u16, mpsc::Receiver<String>) {
    let model = model.to_string_lossy();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sirius-offload"))
        .args(["serve", "-m", &model, "--no-fetch", "--port", "0"])
        .args(extra)
        .env_remove("SIRIUS_LOG")
        .stdout(if echo {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .spawn()
        .expect("the server starts");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if echo {
                eprintln!("server: {line}");
            }
            let _ = tx.send(line);
        }
    });
    let port = loop {
        let line = rx
            .recv_timeout(wait)
            .expect("the server prints its address");
        if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            break digits.parse().expect("a port");
        }
    };
    (child, port, rx)
}

/// (status, body) of one raw HTTP/1.1 request to the loopback `port` (0 when the connection
/// fails); reads give up after `read_timeout` where one is given.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
    read_timeout: Option<Duration>,
) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    if read_timeout.is_some() {
        let _ = s.set_read_timeout(read_timeout);
    }
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut text = String::new();
    if s.write_all(req.as_bytes()).is_err() || s.read_to_string(&mut text).is_err() {
        return (0, text);
    }
    let status = (text.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}
