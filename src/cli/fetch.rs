//! Resolving `--model` for the CLI, fetching a preset's weights on first use.
//!
//! The library's `resolve_model_dir` only looks; here, when a known preset has not been fetched
//! yet and this is a source checkout (tools/fetch-model exists), we run the fetch tool so the
//! quick start is one command. `--no-fetch` or SIRIUS_NO_FETCH=1 turns this off.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{resolve_model_dir, Preset};
use crate::error::{Error, Result};

/// The fetch tool: $SIRIUS_FETCH_TOOL, or tools/fetch-model in the source tree this binary
/// was built from.
fn fetch_tool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SIRIUS_FETCH_TOOL") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join("fetch-model");
    p.is_file().then_some(p)
}

pub fn model_dir_or_fetch(model: &str, allow_fetch: bool) -> Result<PathBuf> {
    let err = match resolve_model_dir(model) {
        Ok(dir) => return Ok(dir),
        Err(e) => e,
    };
    let fetchable = allow_fetch
        && std::env::var("SIRIUS_NO_FETCH").as_deref() != Ok("1")
        && !Path::new(model).exists()
        && Preset::find(model)?.is_some_and(|p| p.source.is_some());
    let Some(tool) = fetchable.then(fetch_tool).flatten() else {
        return Err(err);
    };
    eprintln!(
        "model {model:?} is not fetched yet: running {} {model}",
        tool.display()
    );
    let status = Command::new(&tool)
        .arg(model)
        .status()
        .map_err(|source| Error::Spawn {
            path: tool.clone(),
            source,
        })?;
    if !status.success() {
        return Err(Error::ModelNotFound {
            name: model.to_string(),
            hint: format!(
                "{} {model} failed ({status}); see its output above",
                tool.display()
            ),
        });
    }
    resolve_model_dir(model)
}
