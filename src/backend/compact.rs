//! A layer's resident Griffin neurons across requests: when a new request picks its set,
//! neurons already resident stay where they are (copied within resident memory), and only
//! the others come over the link, as bundles. The compact FFN is then assembled in
//! ascending neuron order, byte for byte what a fresh gather of the new set would give, so
//! the sparse model does not depend on which request came before. [`assemble`] does it on
//! the host (the CPU backend); [`compact_sources`] is the table a device kernel does it from
//! (`OffloadBackend::assemble_compact`).

use crate::error::{Error, Result};

/// A layer's resident compact FFN: neuron ids (ascending) and gate `[k, h]`, up `[k, h]`,
/// down `[h, k]` bytes.
pub struct CompactFfn<'a> {
    pub ids: &'a [u32],
    pub gate: &'a [u8],
    pub up: &'a [u8],
    pub down: &'a [u8],
}

/// Ids of `new` (ascending) that `old` (ascending) lacks: what has to be copied in.
pub fn moved_in(old: &[u32], new: &[u32]) -> Vec<u32> {
    new.iter()
        .copied()
        .filter(|i| old.binary_search(i).is_err())
        .collect()
}

/// Where each neuron of `new_ids` (ascending) comes from when a compact FFN of `old_ids`
/// (ascending) is rebuilt for it: `i < old_ids.len()` is old neuron `i`, `old_ids.len() + s`
/// is staged bundle `s` (the bundles of `moved_in(old_ids, new_ids)`, in that order). Also
/// the number of staged bundles.
pub fn compact_sources(old_ids: &[u32], new_ids: &[u32]) -> Result<(Vec<u32>, usize)> {
    let ko = old_ids.len();
    let mut staged = 0usize;
    let mut out = Vec::with_capacity(new_ids.len());
    for id in new_ids {
        let src = match old_ids.binary_search(id) {
            Ok(i) => i,
            Err(_) => {
                staged += 1;
                ko + staged - 1
            }
        };
        out.push(
            u32::try_from(src).map_err(|_| {
                Error::InvalidArgument(format!("neuron source {src} is past 32 bits"))
            })?,
        );
    }
    Ok((out, staged))
}

/// The compact FFN of `new_ids` from the resident `old` one and `staged`: the gate|up|down
/// bundles (`3 * h * esz` bytes each) of `moved_in(old.ids, new_ids)`, in that order.
pub fn assemble(
    old: Option<&CompactFfn<'_>>,
    staged: &[u8],
    new_ids: &[u32],
    h: usize,
    esz: usize,
) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let row = h * esz;
    let k = new_ids.len();
    let old_ids = old.map_or(&[][..], |o| o.ids);
    let ko = old_ids.len();
    if let Some(o) = old {
        if o.gate.len() != ko * row || o.up.len() != ko * row || o.down.len() != ko * row {
            return Err(Error::InvalidArgument(format!(
                "resident FFN of {ko} neurons has {}/{}/{} bytes, expected {} each",
                o.gate.len(),
                o.up.len(),
                o.down.len(),
                ko * row
            )));
        }
    }
    let moved = new_ids
        .iter()
        .filter(|i| old_ids.binary_search(i).is_err())
        .count();
    if staged.len() != moved * 3 * row {
        return Err(Error::InvalidArgument(format!(
            "{moved} neurons to copy in, but {} staged bytes (expected {})",
            staged.len(),
            moved * 3 * row
        )));
    }
    let mut gate = Vec::with_capacity(k * row);
    let mut up = Vec::with_capacity(k * row);
    let mut down = vec![0u8; k * row];
    let mut next_staged = staged.chunks_exact(3 * row);
    for (j, id) in new_ids.iter().enumerate() {
        // Where neuron `id`'s down column comes from: old column `i`, or the staged bundle.
        match (old, old_ids.binary_search(id)) {
            (Some(o), Ok(i)) => {
                gate.extend_from_slice(&o.gate[i * row..(i + 1) * row]);
                up.extend_from_slice(&o.up[i * row..(i + 1) * row]);
                for r in 0..h {
                    let src = (r * ko + i) * esz;
                    let dst = (r * k + j) * esz;
                    down[dst..dst + esz].copy_from_slice(&o.down[src..src + esz]);
                }
            }
            _ => {
                let b = next_staged.next().ok_or_else(|| {
                    Error::InvalidArgument("fewer staged bundles than neurons to copy in".into())
                })?;
                gate.extend_from_slice(&b[..row]);
                up.extend_from_slice(&b[row..2 * row]);
                for (r, e) in b[2 * row..].chunks_exact(esz).enumerate() {
                    let dst = (r * k + j) * esz;
                    down[dst..dst + esz].copy_from_slice(e);
                }
            }
        }
    }
    Ok((gate, up, down))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::gather_ffn;
    use crate::tensor::DType;

    /// Bundles whose bytes encode (neuron, part, element), so misplacement shows.
    fn bundles(f: usize, h: usize) -> Vec<u8> {
        (0..f)
            .flat_map(|i| (0..3 * h).flat_map(move |e| ((i * 1000 + e) as u16).to_le_bytes()))
            .collect()
    }

    fn stage(all: &[u8], ids: &[u32], h: usize) -> Vec<u8> {
        let bb = 3 * h * 2;
        ids.iter()
            .flat_map(|&i| all[i as usize * bb..(i as usize + 1) * bb].to_vec())
            .collect()
    }

    #[test]
    fn assembling_from_old_and_staged_equals_a_fresh_gather() {
        let (f, h) = (40, 6);
        let all = bundles(f, h);
        let old_ids: Vec<u32> = vec![1, 3, 4, 8, 15, 22, 30, 39];
        let new_ids: Vec<u32> = vec![0, 3, 8, 9, 10, 22, 31, 39];
        let (og, ou, od) = gather_ffn(&all, DType::BF16, h, &old_ids);
        let old = CompactFfn {
            ids: &old_ids,
            gate: &og,
            up: &ou,
            down: &od,
        };
        let moved = moved_in(&old_ids, &new_ids);
        assert_eq!(moved, vec![0, 9, 10, 31]);
        let got = assemble(Some(&old), &stage(&all, &moved, h), &new_ids, h, 2).unwrap();
        assert_eq!(got, gather_ffn(&all, DType::BF16, h, &new_ids));
        // Nothing resident: everything is staged.
        let got = assemble(None, &stage(&all, &new_ids, h), &new_ids, h, 2).unwrap();
        assert_eq!(got, gather_ffn(&all, DType::BF16, h, &new_ids));
        // Too few staged bytes is an error, not a panic.
        assert!(assemble(Some(&old), &stage(&all, &moved[1..], h), &new_ids, h, 2).is_err());
    }

    #[test]
    fn the_source_table_says_what_assemble_copies() {
        let old_ids: Vec<u32> = vec![1, 3, 4, 8];
        let new_ids: Vec<u32> = vec![0, 3, 8, 9];
        let (src, staged) = compact_sources(&old_ids, &new_ids).unwrap();
        // 0: staged 0; 3: old 1; 8: old 3; 9: staged 1 (old ids count 4).
        assert_eq!(src, vec![4, 1, 3, 5]);
        assert_eq!(staged, moved_in(&old_ids, &new_ids).len());
        let (src, staged) = compact_sources(&[], &new_ids).unwrap();
        assert_eq!((src, staged), (vec![0, 1, 2, 3], 4));
    }
}
