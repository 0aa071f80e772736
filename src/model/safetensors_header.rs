//! A safetensors header read again, by us, when the upstream parser refused it: its errors
//! are bare names (`TensorInvalidInfo`, `ValidationOverflow`) or name another tensor than the
//! one at fault (`InvalidOffset`). This finds the tensor and says what is wrong with it.

use serde_json::{Map, Value};

/// Bytes per element of each dtype the format defines.
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// One tensor's entry, checked on its own.
struct Entry<'a> {
    name: &'a str,
    start: u64,
    end: u64,
}

/// What is wrong with the header of `file` (the whole file's bytes), naming the tensor at
/// fault, or `None` when this reading finds nothing (the caller then words the upstream
/// error).
pub(crate) fn diagnose(file: &[u8]) -> Option<String> {
    let len_bytes: [u8; 8] = file.get(..8)?.try_into().ok()?;
    let header_len = usize::try_from(u64::from_le_bytes(len_bytes)).ok()?;
    let header = file.get(8..8usize.checked_add(header_len)?)?;
    let data_len = (file.len() - 8 - header_len) as u64;
    let text = match std::str::from_utf8(header) {
        Ok(text) => text,
        Err(e) => {
            return Some(format!(
                "the JSON header is not UTF-8 text (bad byte at {})",
                e.valid_up_to()
            ))
        }
    };
    let json: Map<String, Value> = match serde_json::from_str(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Some("the JSON header is not an object of tensors".into()),
        Err(e) => return Some(format!("the JSON header is unreadable: {e}")),
    };
    let mut entries = Vec::new();
    for (name, info) in &json {
        if name == "__metadata__" {
            continue;
        }
        match entry(name, info) {
            Ok(e) => entries.push(e),
            Err(why) => return Some(format!("tensor `{name}`: {why}")),
        }
    }
    coverage(entries, data_len)
}

/// `info` of tensor `name`: its dtype known, its shape's bytes those of its offsets.
fn entry<'a>(name: &'a str, info: &Value) -> Result<Entry<'a>, String> {
    let dtype = info
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or("no `dtype` name")?;
    let size = dtype_size(dtype).ok_or_else(|| format!("unknown dtype {dtype:?}"))?;
    let shape: Vec<u64> = (info.get("shape").and_then(Value::as_array))
        .ok_or("no `shape` list")?
        .iter()
        .map(|d| d.as_u64().ok_or("a `shape` entry is not a whole number"))
        .collect::<Result<_, _>>()?;
    let offsets: Vec<u64> = (info.get("data_offsets").and_then(Value::as_array))
        .ok_or("no `data_offsets` pair")?
        .iter()
        .map(|d| {
            d.as_u64()
                .ok_or("a `data_offsets` entry is not a whole number")
        })
        .collect::<Result<_, _>>()?;
    let [start, end] = offsets[..] else {
        return Err(format!(
            "`data_offsets` has {} numbers, not 2",
            offsets.len()
        ));
    };
    if end < start {
        return Err(format!(
            "`data_offsets` [{start}, {end}] end before they start"
        ));
    }
    let bytes = (shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d)))
        .and_then(|n| n.checked_mul(size))
        .ok_or_else(|| format!("shape {shape:?} of {dtype} is too large to exist"))?;
    if end - start != bytes {
        return Err(format!(
            "shape {shape:?} of {dtype} needs {bytes} bytes, but `data_offsets` [{start}, {end}] hold {}",
            end - start
        ));
    }
    Ok(Entry { name, start, end })
}

/// The tensors' byte ranges, in order, must tile the data section exactly.
fn coverage(mut entries: Vec<Entry<'_>>, data_len: u64) -> Option<String> {
    entries.sort_by_key(|e| (e.start, e.end));
    let mut at = 0u64;
    for e in &entries {
        if e.start != at {
            let what = match e.start < at {
                true => "overlap the tensor before it",
                false => "leave a gap after the tensor before it",
            };
            return Some(format!(
                "tensor `{}`: `data_offsets` start at {}, which would {what} (it ends at {at})",
                e.name, e.start
            ));
        }
        at = e.end;
    }
    match at.cmp(&data_len) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => Some(format!(
            "the tensors need {at} bytes of data but the file holds {data_len} after its header: \
             it is truncated; download or convert it again"
        )),
        std::cmp::Ordering::Less => Some(format!(
            "{} bytes after the last tensor belong to none: the file is corrupt",
            data_len - at
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(0u8, data));
        out
    }

    #[test]
    fn names_the_tensor_at_fault() {
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[3],"data_offsets":[8,16]}}"#,
                16,
                "`b`",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                16,
                "overlap",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
                8,
                "too large",
            ),
            (
                r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#,
                8,
                "unknown dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                4,
                "truncated",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
                8,
                "end before",
            ),
        ];
        for (header, data, needle) in cases {
            let msg = diagnose(&file(header, data)).expect(header);
            assert!(msg.contains(needle), "{msg}");
        }
        let fine = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert_eq!(diagnose(&file(fine, 8)), None);
    }
}
