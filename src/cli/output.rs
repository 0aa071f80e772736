//! Report files written by subcommands (`--stats-json`, `bench --json`, `eval --json`) and
//! reports printed to standard output.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// Fails early, before minutes of work, when the report cannot be written where `flag` says:
/// its directory is missing, it names a directory, or it cannot be opened for writing (an
/// existing file is left as it was; a file created to try is removed again).
pub fn check_output_dir(flag: &str, path: Option<&Path>) -> Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let fail = |why: String| {
        Err(Error::InvalidArgument(format!(
            "{flag} {}: {why}",
            path.display()
        )))
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return fail(format!("directory {} does not exist", parent.display()));
        }
    }
    if path.is_dir() {
        return fail("is a directory: give a file name".into());
    }
    let existed = path.exists();
    let opened = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path);
    match opened {
        Ok(_) if !existed => {
            let _ = std::fs::remove_file(path);
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => fail(format!(
            "cannot be written ({e}): give a path in a directory you can write to"
        )),
    }
}

/// Writes `value` as pretty JSON followed by a newline.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let json =
        serde_json::to_string_pretty(value).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    std::fs::write(path, json + "\n").map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a report to standard output; a reader that went away (`| head`) is not an error.
pub fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match std::io::Write::write_all(&mut out, text.as_bytes())
        .and_then(|()| std::io::Write::flush(&mut out))
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Write {
            path: "standard output".into(),
            source: e,
        }),
        _ => Ok(()),
    }
}
