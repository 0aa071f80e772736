//! Byte-level mutations, for any file: bits flipped, bytes replaced, integers at edge values
//! written over a run (at a known integer field when the format's writer listed them),
//! truncation, random insertions and splices from another input.

use super::Rng;

/// Integers that break careless size arithmetic.
pub const EDGE_INTS: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 48,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// An integer field of a serialized file: where it starts and how many bytes it has.
#[derive(Clone, Copy)]
pub struct Field {
    pub at: usize,
    pub width: usize,
}

/// An edge value, sometimes nudged by one (off-by-one limits), as `width` little-endian bytes.
pub fn edge_bytes(rng: &mut Rng, width: usize) -> Vec<u8> {
    let mut v = *rng.pick(&EDGE_INTS);
    match rng.below(4) {
        0 => v = v.wrapping_add(1),
        1 => v = v.wrapping_sub(1),
        _ => {}
    }
    v.to_le_bytes()[..width.min(8)].to_vec()
}

/// One to three random mutations of `input`; `fields` are its integer fields, `other` a
/// second input to splice from.
pub fn mutate(rng: &mut Rng, input: &[u8], fields: &[Field], other: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(b.len());
        match rng.below(8) {
            0 => b[at] = rng.next() as u8,
            1 => b[at] ^= 1 << rng.below(8),
            2 => {
                let n = [1, 2, 4, 8][rng.below(4)].min(b.len() - at);
                let v = edge_bytes(rng, n);
                b[at..at + n].copy_from_slice(&v);
            }
            3 if !fields.is_empty() => {
                let f = *rng.pick(fields);
                if f.at + f.width <= b.len() {
                    let v = edge_bytes(rng, f.width);
                    b[f.at..f.at + f.width].copy_from_slice(&v);
                }
            }
            4 => b.truncate(at),
            5 => {
                let extra: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                b.splice(at..at, extra);
            }
            6 => {
                let n = rng.below(64).min(b.len() - at);
                b.drain(at..at + n);
            }
            _ if !other.is_empty() => {
                let from = rng.below(other.len());
                let n = rng.below(64).min(other.len() - from).min(b.len() - at);
                b[at..at + n].copy_from_slice(&other[from..from + n]);
            }
            _ => b[at] = rng.next() as u8,
        }
    }
    b
}

/// Random bytes, short or long.
pub fn random(rng: &mut Rng) -> Vec<u8> {
    let n = [0, 1, 8, 16, 64, 1024][rng.below(6)];
    (0..n).map(|_| rng.next() as u8).collect()
}
