//! Report files written by subcommands (`--stats-json`, `bench --json`, `eval --json`) and
//! reports printed to standard output.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// Fails early, before minutes of work, when the report's directory does not exist.
pub fn check_output_dir(flag: &str, path: Option<&Path>) -> Result<()> {
    if let Some(parent) = path
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
    {
        if !parent.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{flag}: directory {} does not exist",
                parent.display()
            )));
        }
    }
    Ok(())
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
