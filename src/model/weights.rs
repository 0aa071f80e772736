//! Memory-mapped safetensors checkpoints, single-file or sharded.
//!
//! Nothing is copied to the heap: each shard is mapped once and tensors are byte ranges of the
//! mapping. The kernels read the checkpoint's dtype directly.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensorError, SafeTensors};

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};

/// Where one tensor's bytes live.
#[derive(Debug, Clone)]
struct TensorEntry {
    shard: usize,
    /// Byte range inside the shard's mapping (header already skipped).
    start: usize,
    end: usize,
    /// The stored dtype, or its name when we cannot compute with it (an error only if the
    /// model asks for that tensor: checkpoints may carry extra tensors we never read).
    dtype: Result<DType, String>,
    shape: Vec<usize>,
}

/// Where [`WeightStore::from_mappings`] finds one tensor.
pub struct MappedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Index of the mapping that holds it.
    pub mapping: usize,
    /// Its bytes in that mapping.
    pub range: Range<usize>,
}

/// All tensors of a checkpoint directory.
pub struct WeightStore {
    shards: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, TensorEntry>,
}

impl WeightStore {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<WeightStore> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_files_from_index(&index)?
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors and no model.safetensors.index.json in the model directory",
                ),
            ));
        };
        Self::open_files(&files)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<WeightStore> {
        let mut store = WeightStore {
            shards: Vec::new(),
            tensors: HashMap::new(),
        };
        for path in files {
            store.add_shard(path)?;
        }
        Ok(store)
    }

    fn add_shard(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the
        // checkpoint not being truncated by another process while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                msg: crate::model::safetensors_header::diagnose(&map)
                    .unwrap_or_else(|| describe_safetensors_error(&e, map.len())),
            })?;
        let data_start = 8 + header_len;
        let shard = self.shards.len();
        for (name, info) in metadata.tensors() {
            let dtype = match info.dtype {
                StDtype::F32 => Ok(DType::F32),
                StDtype::F16 => Ok(DType::F16),
                StDtype::BF16 => Ok(DType::BF16),
                other => Err(format!("{other:?}")),
            };
            let (s, e) = info.data_offsets;
            let entry = TensorEntry {
                shard,
                start: data_start + s,
                end: data_start + e,
                dtype,
                shape: info.shape.clone(),
            };
            if let Some(previous) = self.tensors.insert(name.clone(), entry) {
                return Err(Error::Safetensors {
                    path: path.to_path_buf(),
                    msg: format!(
                        "tensor `{name}` is also in {}: a checkpoint must hold each tensor once",
                        self.shards[previous.shard].0.display()
                    ),
                });
            }
        }
        self.shards.push((path.to_path_buf(), Arc::new(map)));
        Ok(())
    }

    /// A store over mappings made elsewhere (a GGUF file and what was converted from it):
    /// `tensors` lists each tensor's name, dtype, shape, mapping (index into `maps`) and byte
    /// range there; `path` names the source in errors.
    pub fn from_mappings(
        path: PathBuf,
        maps: Vec<Arc<Mmap>>,
        tensors: Vec<MappedTensor>,
    ) -> Result<WeightStore> {
        let mut store = WeightStore {
            shards: Vec::new(),
            tensors: HashMap::new(),
        };
        for MappedTensor {
            name,
            dtype,
            shape,
            mapping: shard,
            range,
        } in tensors
        {
            let bytes = dtype.bytes_for(shape.iter().product::<usize>());
            let map_len = maps.get(shard).map_or(0, |m| m.len());
            if range.end > map_len || range.len() != bytes {
                return Err(Error::InvalidArgument(format!(
                    "tensor `{name}` of {}: {bytes} bytes do not fit {range:?} of mapping {shard} ({map_len} bytes)",
                    path.display(),
                )));
            }
            let entry = TensorEntry {
                shard,
                start: range.start,
                end: range.end,
                dtype: Ok(dtype),
                shape,
            };
            if store.tensors.insert(name.clone(), entry).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "tensor `{name}` appears twice in {}",
                    path.display()
                )));
            }
        }
        store.shards = maps.into_iter().map(|m| (path.clone(), m)).collect();
        Ok(store)
    }

    /// The store with every matrix (2-D tensor) converted to `to` where its rows can hold it
    /// (`--weights q8_0|q4_0|...` on a float checkpoint), into one anonymous mapping beside
    /// the checkpoint's; vectors (norms, biases) and matrices whose rows are not whole blocks
    /// of `to` stay as stored.
    pub fn converted(mut self, to: DType) -> Result<WeightStore> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort_unstable();
        let mut jobs = Vec::new();
        let mut moved = Vec::new();
        for name in names {
            let e = &self.tensors[name];
            let (Ok(from), &[rows, cols]) = (&e.dtype, &e.shape[..]) else {
                continue;
            };
            let bytes = &self.shards[e.shard].1[e.start..e.end];
            // A tensor whose bytes disagree with its shape is left for `get` to report.
            if *from == to || !to.fits_row(cols) || bytes.len() != from.bytes_for(rows * cols) {
                continue;
            }
            jobs.push(crate::model::convert::ConvertJob {
                name,
                bytes,
                from: *from,
                to,
                rows,
                cols,
                unpermute_heads: 0,
            });
            moved.push(name.clone());
        }
        if jobs.is_empty() {
            return Ok(self);
        }
        let (map, ranges) = crate::model::convert::convert_all(&jobs, &format!("{to}"))?;
        drop(jobs);
        tracing::info!("{} matrices converted to {to} at load", moved.len());
        let shard = self.shards.len();
        let path = self.shards[0].0.clone();
        self.shards.push((path, Arc::new(map)));
        for (name, range) in moved.iter().zip(ranges) {
            if let Some(e) = self.tensors.get_mut(name) {
                *e = TensorEntry {
                    shard,
                    start: range.start,
                    end: range.end,
                    dtype: Ok(to),
                    shape: e.shape.clone(),
                };
            }
        }
        Ok(self)
    }

    /// Fetches a tensor and checks its shape.
    pub fn get(&self, name: &str, expected_shape: &[usize]) -> Result<TensorRef> {
        let entry = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: self.error_name(name),
            searched: self.describe_files(),
        })?;
        let (path, map) = &self.shards[entry.shard];
        let dtype = entry
            .dtype
            .clone()
            .map_err(|dtype| Error::UnsupportedDType {
                path: path.clone(),
                name: name.to_string(),
                dtype,
            })?;
        if entry.shape != expected_shape {
            return Err(Error::ShapeMismatch {
                path: path.clone(),
                name: self.error_name(name),
                actual: entry.shape.clone(),
                expected: expected_shape.to_vec(),
            });
        }
        Ok(TensorRef::new(
            name.to_string(),
            dtype,
            entry.shape.clone(),
            path.clone(),
            Arc::clone(map),
            entry.start..entry.end,
        ))
    }

    /// Every tensor, sorted by name (`Err` for one whose dtype cannot be read).
    pub fn all(&self) -> Result<Vec<TensorRef>> {
        (self.shapes().into_iter())
            .map(|(name, shape)| self.get(name, shape))
            .collect()
    }

    /// The file that holds tensor `name`.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        let entry = self.tensors.get(name)?;
        Some(self.shards.get(entry.shard)?.0.as_path())
    }

    /// The dtype most of the checkpoint's float matrices share (what a matrix of another
    /// float type is told it differs from); `None` without float matrices.
    pub fn common_float_dtype(&self) -> Option<DType> {
        let mut counts: Vec<(DType, usize)> = Vec::new();
        let floats = (self.tensors.values())
            .filter(|t| t.shape.len() == 2)
            .filter_map(|t| t.dtype.clone().ok())
            .filter(|d| !d.is_quantized());
        for dtype in floats {
            match counts.iter_mut().find(|(d, _)| *d == dtype) {
                Some((_, n)) => *n += 1,
                None => counts.push((dtype, 1)),
            }
        }
        counts.into_iter().max_by_key(|&(_, n)| n).map(|(d, _)| d)
    }

    /// Every tensor's name and shape, sorted by name.
    pub fn shapes(&self) -> Vec<(&str, &[usize])> {
        let mut all: Vec<(&str, &[usize])> = self
            .tensors
            .iter()
            .map(|(name, t)| (name.as_str(), t.shape.as_slice()))
            .collect();
        all.sort_unstable();
        all
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|t| t.end - t.start).sum()
    }

    /// `name` as an error shows it: with its name in the file when that is a GGUF, whose
    /// tensors are named otherwise (`blk.0.ffn_gate.weight`).
    fn error_name(&self, name: &str) -> String {
        let gguf = self
            .shards
            .first()
            .is_some_and(|(p, _)| crate::config::is_gguf(p));
        match crate::model::gguf::weights::gguf_name(name).filter(|_| gguf) {
            Some(stored) => format!("{name}` / `{stored}"),
            None => name.to_string(),
        }
    }

    fn describe_files(&self) -> String {
        let names: Vec<String> = self
            .shards
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        names.join(", ")
    }
}

fn shard_files_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(index, "missing object `weight_map`"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::config(
                index,
                format!("weight_map entry for `{tensor}` is not a file name"),
            )
        })?;
        // Shards live beside the index: no directories, no `..`, no absolute paths.
        let mut parts = Path::new(file).components();
        if !matches!(
            (parts.next(), parts.next()),
            (Some(std::path::Component::Normal(_)), None)
        ) {
            return Err(Error::config(
                index,
                format!("weight_map entry for `{tensor}` is {file:?}, not a file name in the model directory"),
            ));
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::config(index, "weight_map is empty"));
    }
    Ok(files)
}

fn describe_safetensors_error(e: &SafeTensorError, file_len: usize) -> String {
    match e {
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the header's tensor offsets do not match the file size ({file_len} bytes): \
             the file is truncated or corrupt; download or convert it again"
        ),
        SafeTensorError::HeaderTooSmall | SafeTensorError::InvalidHeaderLength => format!(
            "the file ({file_len} bytes) is too short to hold its header: truncated or not a safetensors file"
        ),
        SafeTensorError::InvalidHeaderDeserialization | SafeTensorError::InvalidHeader => {
            "the JSON header is unreadable".to_string()
        }
        SafeTensorError::HeaderTooLarge => {
            "the header claims to be larger than safetensors allows (100 MB): corrupt or not a safetensors file".to_string()
        }
        SafeTensorError::InvalidOffset(_)
        | SafeTensorError::TensorInvalidInfo
        | SafeTensorError::ValidationOverflow => {
            "a tensor's offsets, shape and dtype disagree: the header is corrupt; download or \
             convert the file again"
                .to_string()
        }
        other => format!("{other}: the file is corrupt; download or convert it again"),
    }
}
