//! GGUF metadata values and ggml tensor types.

use super::reader::Reader;
use crate::tensor::DType;

type Res<T> = std::result::Result<T, String>;

/// Arrays nest at most this deep (GGUF allows arrays of arrays; files use one level).
const MAX_ARRAY_DEPTH: u32 = 2;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// A value: its type id (u32), then the value.
    pub(super) fn read(r: &mut Reader) -> Res<Value> {
        let kind = r.u32()?;
        Value::read_of(r, kind, 0)
    }

    fn read_of(r: &mut Reader, kind: u32, depth: u32) -> Res<Value> {
        Ok(match kind {
            0 => Value::U8(r.u8()?),
            1 => Value::I8(r.u8()? as i8),
            2 => Value::U16(r.u16()?),
            3 => Value::I16(r.u16()? as i16),
            4 => Value::U32(r.u32()?),
            5 => Value::I32(r.u32()? as i32),
            6 => Value::F32(f32::from_bits(r.u32()?)),
            7 => match r.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("bool byte {b}")),
            },
            8 => Value::String(r.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let elem = r.u32()?;
                let count = r.u64()?;
                r.check_count(count, min_size(elem)?, "array elements")?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(Value::read_of(r, elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(r.u64()?),
            11 => Value::I64(r.u64()? as i64),
            12 => Value::F64(f64::from_bits(r.u64()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }

    /// The value as a u64, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// The fewest bytes an element of value type `kind` takes (bounds an array's count).
fn min_size(kind: u32) -> Res<u64> {
    Ok(match kind {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        other => return Err(format!("unknown array element type {other}")),
    })
}

/// The tensor type of ggml type id `id` (the ones this project reads).
pub(super) fn ggml_type(id: u32) -> Res<DType> {
    Ok(match id {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        8 => DType::Q8_0,
        12 => DType::Q4K,
        13 => DType::Q5K,
        14 => DType::Q6K,
        30 => DType::BF16,
        other => {
            return Err(format!(
                "ggml type {other} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K are)"
            ))
        }
    })
}

/// Bytes of a tensor of type `kind` and `dims` (ggml order): rows of `dims[0]` elements must
/// be whole blocks, and the size must not overflow.
pub(super) fn byte_len(kind: DType, dims: &[u64]) -> Res<u64> {
    let (per_block, block_bytes) = kind.block();
    let (per_block, block_bytes) = (per_block as u64, block_bytes as u64);
    let row = *dims.first().ok_or("no dimensions")?;
    if !row.is_multiple_of(per_block) {
        return Err(format!(
            "rows of {row} are not whole {kind} blocks of {per_block}"
        ));
    }
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| (n / per_block).checked_mul(block_bytes))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))
}
