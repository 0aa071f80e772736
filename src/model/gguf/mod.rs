//! GGUF files (llama.cpp's single-file checkpoints, versions 2 and 3), read as untrusted input.
//!
//! Layout: a header (magic `GGUF`, version, tensor count, metadata count), the metadata
//! key/value pairs, the tensor descriptions (name, dimensions, ggml type, offset), padding to
//! `general.alignment` (32 by default), then the tensor data. Every count, length and offset
//! is checked against the bytes that remain before anything is allocated or indexed with it, so
//! a truncated or corrupted file is an error naming what is wrong and where, never a panic or a
//! huge allocation. This module only describes the file; de-quantization and the quantized
//! kernels build on [`GgufTensor::bytes`].

pub mod hf;
mod reader;
mod types;
pub mod weights;

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::DType;
use reader::Reader;
pub use types::Value;

/// Dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Alignment of the tensor data when the metadata does not say.
const DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// ggml order: `dims[0]` is the length of a row (contiguous), as GGUF stores it.
    pub dims: Vec<u64>,
    pub kind: DType,
    /// Absolute byte range of the tensor's data in the file.
    pub start: u64,
    pub len: u64,
}

impl GgufTensor {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The tensor's bytes within `file` (the bytes its [`GgufFile`] was parsed from).
    pub fn bytes<'f>(&self, file: &'f [u8]) -> Option<&'f [u8]> {
        let start = usize::try_from(self.start).ok()?;
        let len = usize::try_from(self.len).ok()?;
        file.get(start..start.checked_add(len)?)
    }
}

/// The description of a GGUF file: its metadata and where each tensor lies.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<GgufTensor>,
    /// Where the tensor data begins (aligned).
    pub data_start: u64,
}

impl GgufFile {
    /// Parses the header, metadata and tensor descriptions of `bytes` (the whole file; `path`
    /// only names it in errors) and checks every tensor's data lies inside the file.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<GgufFile> {
        let fail = |msg: String| Error::gguf(path, msg);
        let mut r = Reader::new(bytes);
        let (version, n_tensors, n_kv) = header(&mut r).map_err(fail)?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r
                .string()
                .map_err(|e| fail(format!("metadata entry {i}: {e}")))?;
            let value = Value::read(&mut r).map_err(|e| fail(format!("metadata `{key}`: {e}")))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(fail(format!("metadata key `{key}` appears twice")));
            }
        }
        let mut infos = Vec::new();
        for i in 0..n_tensors {
            infos.push(tensor_info(&mut r).map_err(|e| fail(format!("tensor {i}: {e}")))?);
        }
        let alignment = alignment(&metadata).map_err(fail)?;
        let data_start = r.position().next_multiple_of(alignment);
        let tensors = place(infos, data_start, alignment, bytes.len() as u64).map_err(fail)?;
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    /// A string metadata value.
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// An unsigned integer metadata value of any width.
    pub fn uint(&self, key: &str) -> Option<u64> {
        self.metadata.get(key).and_then(Value::as_u64)
    }

    /// A float metadata value (f32 or f64).
    pub fn float(&self, key: &str) -> Option<f64> {
        match self.metadata.get(key) {
            Some(Value::F32(v)) => Some(f64::from(*v)),
            Some(Value::F64(v)) => Some(*v),
            _ => None,
        }
    }

    /// A boolean metadata value.
    pub fn flag(&self, key: &str) -> Option<bool> {
        match self.metadata.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// An array metadata value (`None` when absent or not an array).
    pub fn array(&self, key: &str) -> Option<&[Value]> {
        match self.metadata.get(key) {
            Some(Value::Array(items)) => Some(items),
            _ => None,
        }
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// `(version, tensor count, metadata count)`.
fn header(r: &mut Reader) -> std::result::Result<(u32, u64, u64), String> {
    let magic = r.bytes(4).map_err(|e| format!("header: {e}"))?;
    if magic != b"GGUF" {
        return Err(format!("magic is {magic:02x?}, not \"GGUF\""));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("version {version}: supported are GGUF 2 and 3"));
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    // The smallest tensor description is 32 bytes, the smallest metadata entry 13: counts that
    // could not fit in what remains are refused before any loop trusts them.
    r.check_count(n_kv, 13, "metadata entries")?;
    r.check_count(n_tensors, 32, "tensors")?;
    Ok((version, n_tensors, n_kv))
}

/// One tensor description: `(name, dims, type, offset relative to the data start)`.
fn tensor_info(r: &mut Reader) -> std::result::Result<(String, Vec<u64>, DType, u64), String> {
    let name = r.string()?;
    let n_dims = r.u32()?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(format!(
            "`{name}` has {n_dims} dimensions (1 to {MAX_DIMS})"
        ));
    }
    let dims = (0..n_dims)
        .map(|_| r.u64())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let kind = types::ggml_type(r.u32()?).map_err(|e| format!("`{name}`: {e}"))?;
    let offset = r.u64()?;
    Ok((name, dims, kind, offset))
}

fn alignment(metadata: &BTreeMap<String, Value>) -> std::result::Result<u64, String> {
    match metadata.get("general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => Ok(a),
            _ => Err(format!(
                "general.alignment is {v:?}, not a power of two up to 1 MiB"
            )),
        },
    }
}

/// Checks each tensor's size (whole blocks per row, no overflow), alignment and that its data
/// lies inside a file of `file_len` bytes; returns the tensors with absolute ranges.
fn place(
    infos: Vec<(String, Vec<u64>, DType, u64)>,
    data_start: u64,
    alignment: u64,
    file_len: u64,
) -> std::result::Result<Vec<GgufTensor>, String> {
    let mut names = std::collections::HashSet::new();
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, dims, kind, offset) in infos {
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        let len = types::byte_len(kind, &dims).map_err(|e| format!("`{name}`: {e}"))?;
        let start = data_start
            .checked_add(offset)
            .filter(|_| offset.is_multiple_of(alignment))
            .ok_or_else(|| format!("`{name}`: offset {offset} not aligned to {alignment}"))?;
        if start.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(format!(
                "`{name}`: {len} bytes at offset {start} run past the end of the file ({file_len} bytes)"
            ));
        }
        tensors.push(GgufTensor {
            name,
            dims,
            kind,
            start,
            len,
        });
    }
    Ok(tensors)
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
