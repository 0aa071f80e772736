//! Report files written by subcommands (`--stats-json`, `bench --json`).

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// Fails early, before minutes of work, when the report's directory does not exist.
pub fn check_output_dir(flag: &str, path: Option<&Path>) -> Result<()> {
    if let Some(parent) = path.and_then(Path::parent).filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::InvalidArgument(format!("{flag}: directory {} does not exist", parent.display())));
        }
    }
    Ok(())
}

/// Writes `value` as pretty JSON followed by a newline.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(value).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    std::fs::write(path, json + "\n").map_err(|source| Error::Write { path: path.to_path_buf(), source })
}
