//! Float FFNs stream as neuron bundles (gate row, up row, down column together, see
//! `crate::sparsity::bundles`), a layout the checkpoint does not have. Building it in
//! anonymous memory would hold every FFN weight twice on the host (the checkpoint mapping and
//! the copy: 141 GB + 113 GB for Llama-3-70B in bf16). Instead the bundles are written once
//! to a cache file beside the model and memory-mapped: file-backed pages the kernel can drop
//! and read again, shared by every later run, and the checkpoint's FFN pages are never read
//! again after the first build.
//!
//! The file: a 4096-byte header (magic, then the JSON key it was built for), then each
//! layer's bundles back to back, page-aligned. A file whose key or length does not match is
//! rebuilt; a new file is written under a temporary name and renamed into place, so a run
//! that stops halfway never leaves a file that looks complete.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::Serialize;

use crate::config::sirius_home;
use crate::error::{Error, Result};
use crate::progress::progress_bar;

const MAGIC: &[u8; 16] = b"sirius-bundles\0\x01";
/// Header bytes: layer data starts page-aligned (mappings and DMA registration are by page).
pub const HEADER_BYTES: usize = 4096;

/// What a cache file was built from: the checkpoint files (names, sizes, modification
/// times), the loaded FFN format and shapes. Any change rebuilds the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheKey {
    pub version: u32,
    pub files: Vec<(String, u64, u128)>,
    pub dtype: String,
    pub layers: usize,
    pub hidden: usize,
    pub neurons: usize,
    pub layer_bytes: usize,
}

impl CacheKey {
    /// The key of the model at `model` (a directory of safetensors, or a GGUF file).
    pub fn of_model(model: &Path, dtype: &str, shape: [usize; 4]) -> Result<CacheKey> {
        let [layers, hidden, neurons, layer_bytes] = shape;
        Ok(CacheKey {
            version: 1,
            files: checkpoint_files(model)?,
            dtype: dtype.to_string(),
            layers,
            hidden,
            neurons,
            layer_bytes,
        })
    }

    fn header(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(self)
            .map_err(|e| Error::InvalidArgument(format!("bundle cache key: {e}")))?;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&(json.len() as u64).to_le_bytes());
        header.extend_from_slice(&json);
        if header.len() > HEADER_BYTES {
            return Err(Error::InvalidArgument(format!(
                "bundle cache key of {} bytes does not fit the {HEADER_BYTES}-byte header \
                 (too many checkpoint files)",
                header.len()
            )));
        }
        header.resize(HEADER_BYTES, 0);
        Ok(header)
    }
}

/// Each checkpoint file of `model` with its size and modification time (ns), sorted by name.
fn checkpoint_files(model: &Path) -> Result<Vec<(String, u64, u128)>> {
    let io = |e| Error::io(model.display().to_string(), e);
    let paths: Vec<PathBuf> = match model.is_dir() {
        true => std::fs::read_dir(model)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "safetensors" || x == "gguf")
            })
            .collect(),
        false => vec![model.to_path_buf()],
    };
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        let meta = std::fs::metadata(&p).map_err(|e| Error::io(p.display().to_string(), e))?;
        let mtime = (meta.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let name = p
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into());
        files.push((name, meta.len(), mtime));
    }
    files.sort();
    Ok(files)
}

/// Where the cache of `model`'s bundles in `dtype` lives: beside the model
/// (`<dir>/.sirius-cache/ffn-bundles-<dtype>.bin`, or `<stem>.ffn-bundles-<dtype>.bin` beside
/// a GGUF file), else under `$SIRIUS_HOME/bundles/` when the model's folder is read-only.
pub fn cache_paths(model: &Path, dtype: &str) -> [PathBuf; 2] {
    let beside = match model.is_dir() {
        true => model
            .join(".sirius-cache")
            .join(format!("ffn-bundles-{dtype}.bin")),
        false => {
            let stem = model
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into());
            let dir = model.parent().unwrap_or(Path::new("."));
            dir.join(".sirius-cache")
                .join(format!("{stem}.ffn-bundles-{dtype}.bin"))
        }
    };
    let canonical = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
    let name = format!(
        "{:016x}-ffn-bundles-{dtype}.bin",
        fnv1a(canonical.to_string_lossy().as_bytes())
    );
    [beside, sirius_home().join("bundles").join(name)]
}

/// 64-bit FNV-1a: a stable name for a path (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The mapped cache of `key` at the first of `paths` that has it or can be written, built
/// with `layer(li)` (each exactly `key.layer_bytes`) where no valid file exists. Returns the
/// mapping, the path, and whether it was reused.
pub fn open_or_build(
    paths: &[PathBuf],
    key: &CacheKey,
    layer: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
) -> Result<(Arc<Mmap>, PathBuf, bool)> {
    let header = key.header()?;
    let expected = HEADER_BYTES as u64 + (key.layers * key.layer_bytes) as u64;
    for path in paths {
        if let Some(map) = reuse(path, &header, expected) {
            return Ok((map, path.clone(), true));
        }
    }
    let mut why = Vec::new();
    for path in paths {
        match build(path, &header, key, layer) {
            Ok(()) => {
                let map = map_file(path)?;
                return Ok((map, path.clone(), false));
            }
            Err(e) => why.push(format!("{}: {e}", path.display())),
        }
    }
    Err(Error::InvalidArgument(format!(
        "could not write the FFN bundle cache ({}): make the model's folder or $SIRIUS_HOME \
         writable",
        why.join("; ")
    )))
}

/// The mapping of `path` if it is a complete cache with this header.
fn reuse(path: &Path, header: &[u8], expected: u64) -> Option<Arc<Mmap>> {
    let mut file = File::open(path).ok()?;
    if file.metadata().ok()?.len() != expected {
        return None;
    }
    let mut found = vec![0u8; HEADER_BYTES];
    file.read_exact(&mut found).ok()?;
    if found != header {
        return None;
    }
    map_file(path).ok()
}

fn map_file(path: &Path) -> Result<Arc<Mmap>> {
    let file = File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    // SAFETY: the file was completed and renamed into place before it is mapped; it is
    // replaced only by renaming a new file over it, which leaves this mapping's inode intact.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path.display().to_string(), e))?;
    Ok(Arc::new(map))
}

/// Writes the cache under a temporary name, then renames it into place.
fn build(
    path: &Path,
    header: &[u8],
    key: &CacheKey,
    layer: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let io = |e| Error::io(path.display().to_string(), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = (|| {
        let mut out = BufWriter::new(File::create(&tmp).map_err(io)?);
        out.write_all(header).map_err(io)?;
        let bar = progress_bar(key.layers as u64, "FFN bundle cache");
        for li in 0..key.layers {
            let bytes = layer(li)?;
            if bytes.len() != key.layer_bytes {
                return Err(Error::InvalidArgument(format!(
                    "layer {li}'s bundles are {} bytes, expected {}",
                    bytes.len(),
                    key.layer_bytes
                )));
            }
            out.write_all(&bytes).map_err(io)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        out.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)
    })();
    match written {
        Ok(()) => std::fs::rename(&tmp, path).map_err(io),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(layer_bytes: usize) -> CacheKey {
        CacheKey {
            version: 1,
            files: vec![("model.safetensors".into(), 10, 5)],
            dtype: "bf16".into(),
            layers: 3,
            hidden: 2,
            neurons: 4,
            layer_bytes,
        }
    }

    #[test]
    fn a_cache_is_built_once_then_reused_and_rebuilt_when_its_key_changes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().join("a/cache.bin")];
        let mut built = 0;
        let mut layer = |li: usize| {
            built += 1;
            Ok(vec![li as u8; 8])
        };
        let (map, _, reused) = open_or_build(&paths, &key(8), &mut layer).unwrap();
        assert!(!reused);
        assert_eq!(&map[HEADER_BYTES + 8..HEADER_BYTES + 16], &[1u8; 8]);
        let (_, _, reused) = open_or_build(&paths, &key(8), &mut layer).unwrap();
        assert!(reused);
        let changed = CacheKey {
            dtype: "f16".into(),
            ..key(8)
        };
        let (_, _, reused) = open_or_build(&paths, &changed, &mut layer).unwrap();
        assert!(!reused);
        assert_eq!(built, 6);
    }

    #[test]
    fn a_failed_build_leaves_no_file_and_the_next_path_is_tried() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the first path's folder should be: that path cannot be written.
        std::fs::write(dir.path().join("blocked"), b"x").unwrap();
        let paths = [
            dir.path().join("blocked/cache.bin"),
            dir.path().join("second/cache.bin"),
        ];
        let mut layer = |_| Ok(vec![7u8; 4]);
        let (_, path, _) = open_or_build(&paths, &key(4), &mut layer).unwrap();
        assert_eq!(path, paths[1]);
        // A layer of the wrong size fails the build and removes the temporary file.
        let one = [dir.path().join("third/cache.bin")];
        let mut short = |_| Ok(vec![7u8; 3]);
        let err = open_or_build(&one, &key(4), &mut short)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 4"), "{err}");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("third"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn cache_paths_sit_beside_the_model_then_under_the_home() {
        let dir = tempfile::tempdir().unwrap();
        let [beside, home] = cache_paths(dir.path(), "bf16");
        assert_eq!(
            beside,
            dir.path().join(".sirius-cache/ffn-bundles-bf16.bin")
        );
        let [gguf, _] = cache_paths(&dir.path().join("m.Q4_0.gguf"), "bf16");
        assert_eq!(
            gguf,
            dir.path().join(".sirius-cache/m.Q4_0.ffn-bundles-bf16.bin")
        );
        assert!(home.ends_with(home.file_name().unwrap()));
        assert!(home.to_string_lossy().contains("bundles"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    }
}
