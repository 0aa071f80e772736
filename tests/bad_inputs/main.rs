//! Bad inputs as a new user meets them: broken model directories and files, out-of-range
//! options, malformed server requests. Every case must fail cleanly: a non-zero exit (no
//! signal) or a 4xx status, no panic, and one line that names the culprit (the file, tensor,
//! field or option). The cases are tables: `model_files`, `options`, `requests`.

#[path = "../common/mod.rs"]
mod common;

mod harness;
mod model_files;
mod options;
mod regressions;
mod requests;
