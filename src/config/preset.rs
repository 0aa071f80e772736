//! Named model presets (`configs/models/<name>.toml`) and resolution of `--model`.
//!
//! `--model` takes either a directory holding an HF-layout checkpoint or a preset name. Presets
//! shipped with the project are compiled into the binary, so an installed binary knows them
//! without the source tree; `$SIRIUS_HOME/configs/models/<name>.toml` adds or overrides presets.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Presets compiled into the binary: (name, TOML text).
const BUILTIN_PRESETS: &[(&str, &str)] = &[(
    "smollm2-135m",
    include_str!("../../configs/models/smollm2-135m.toml"),
)];

#[derive(Debug, Clone, Deserialize)]
pub struct PresetSource {
    pub pip_package: Option<String>,
    pub version: Option<String>,
    pub wheel_sha256: Option<String>,
    pub gguf_path: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Preset {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Overrides the default `$SIRIUS_HOME/models/<name>` location of the weights.
    pub path: Option<PathBuf>,
    pub dtype: Option<String>,
    pub source: Option<PresetSource>,
}

impl Preset {
    /// Where this preset's HF-layout directory lives.
    pub fn model_dir(&self) -> PathBuf {
        match &self.path {
            Some(p) => expand_home(p),
            None => sirius_home().join("models").join(&self.name),
        }
    }

    /// Looks a preset up by name: user presets first, then the built-in ones.
    pub fn find(name: &str) -> Result<Option<Preset>> {
        let user = sirius_home()
            .join("configs")
            .join("models")
            .join(format!("{name}.toml"));
        if user.is_file() {
            let text = std::fs::read_to_string(&user).map_err(|e| Error::io(&user, e))?;
            return Self::parse(&text, &user).map(Some);
        }
        for (builtin, text) in BUILTIN_PRESETS {
            if *builtin == name {
                let origin = PathBuf::from(format!("configs/models/{name}.toml"));
                return Self::parse(text, &origin).map(Some);
            }
        }
        Ok(None)
    }

    /// Names of the built-in presets, for error messages and `--help`.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN_PRESETS.iter().map(|(n, _)| *n).collect()
    }

    fn parse(text: &str, origin: &Path) -> Result<Preset> {
        toml::from_str(text).map_err(|e| Error::config(origin, format!("invalid preset: {e}")))
    }
}

/// `$SIRIUS_HOME`, defaulting to `~/.cache/sirius-offload`.
pub fn sirius_home() -> PathBuf {
    if let Some(home) = std::env::var_os("SIRIUS_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    user_home.join(".cache").join("sirius-offload")
}

fn expand_home(p: &Path) -> PathBuf {
    match p.strip_prefix("~") {
        Ok(rest) => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(rest),
        Err(_) => p.to_path_buf(),
    }
}

/// Turns `--model` into a model directory: an existing directory is taken as is, otherwise the
/// argument must name a preset whose weights have been fetched.
pub fn resolve_model_dir(model: &str) -> Result<PathBuf> {
    let as_path = Path::new(model);
    if as_path.is_dir() {
        if !as_path.join("config.json").is_file() {
            return Err(Error::ModelNotFound {
                name: model.to_string(),
                hint:
                    "the directory has no config.json: --model takes a Hugging Face model directory"
                        .into(),
            });
        }
        return Ok(as_path.to_path_buf());
    }
    if as_path.is_file() {
        return Err(Error::ModelNotFound {
            name: model.to_string(),
            hint:
                "it is a file: --model takes the directory that holds config.json and the weights"
                    .into(),
        });
    }
    match Preset::find(model)? {
        Some(preset) => {
            let dir = preset.model_dir();
            if dir.join("config.json").is_file() {
                Ok(dir)
            } else {
                Err(Error::ModelNotFound {
                    name: model.to_string(),
                    hint: format!(
                        "preset {model:?} expects its weights in {}; fetch them with `tools/fetch-model {model}`",
                        dir.display()
                    ),
                })
            }
        }
        None => Err(Error::ModelNotFound {
            name: model.to_string(),
            hint: format!(
                "it is neither a directory nor a preset (known presets: {})",
                Preset::builtin_names().join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_presets_parse() {
        for name in Preset::builtin_names() {
            let p = Preset::find(name).unwrap().unwrap();
            assert_eq!(p.name, name);
        }
    }

    #[test]
    fn unknown_model_lists_presets() {
        let err = resolve_model_dir("no-such-model-xyz")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-model-xyz") && err.contains("smollm2-135m"),
            "{err}"
        );
    }
}
