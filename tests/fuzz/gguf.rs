//! GGUF files for the fuzz loop: a description (metadata entries and tensors) that mutates
//! field by field, and a writer that records where every integer field of the file lies, so
//! byte mutations can set counts, lengths, dimensions, types and offsets to edge values.

use super::bytes::{self, Field};
use super::Rng;

/// Metadata value type ids (GGUF's `gguf_type`).
const STRING: u32 = 8;
const ARRAY: u32 = 9;

pub struct Kv {
    pub key: String,
    pub kind: u32,
    /// The value as written (an array: its element type, count and items).
    pub value: Vec<u8>,
}

pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub kind: u32,
    pub data: Vec<u8>,
}

#[derive(Default)]
pub struct Gguf {
    pub kvs: Vec<Kv>,
    pub tensors: Vec<Tensor>,
}

pub fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn array(kind: u32, items: &[Vec<u8>]) -> Vec<u8> {
    let mut b = kind.to_le_bytes().to_vec();
    b.extend((items.len() as u64).to_le_bytes());
    items.iter().for_each(|i| b.extend(i));
    b
}

fn s(v: &str) -> Vec<u8> {
    let mut b = Vec::new();
    string(&mut b, v);
    b
}

impl Gguf {
    fn kv(&mut self, key: &str, kind: u32, value: Vec<u8>) -> &mut Self {
        self.kvs.push(Kv {
            key: key.into(),
            kind,
            value,
        });
        self
    }

    fn tensor(&mut self, name: &str, dims: &[u64], kind: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push(Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            kind,
            data,
        });
        self
    }

    /// The file (version 3) and its integer fields.
    pub fn write(&self) -> (Vec<u8>, Vec<Field>) {
        let mut out = b"GGUF".to_vec();
        let mut fields = Vec::new();
        let int = |out: &mut Vec<u8>, fields: &mut Vec<Field>, v: u64, width: usize| {
            fields.push(Field {
                at: out.len(),
                width,
            });
            out.extend(&v.to_le_bytes()[..width]);
        };
        int(&mut out, &mut fields, 3, 4);
        int(&mut out, &mut fields, self.tensors.len() as u64, 8);
        int(&mut out, &mut fields, self.kvs.len() as u64, 8);
        for kv in &self.kvs {
            int(&mut out, &mut fields, kv.key.len() as u64, 8);
            out.extend(kv.key.as_bytes());
            int(&mut out, &mut fields, kv.kind as u64, 4);
            if kv.kind == STRING || kv.kind == ARRAY {
                // The value's own length (string) or element type and count (array).
                let width = if kv.kind == STRING { 8 } else { 4 };
                fields.push(Field {
                    at: out.len(),
                    width,
                });
                if kv.kind == ARRAY {
                    fields.push(Field {
                        at: out.len() + 4,
                        width: 8,
                    });
                }
            }
            out.extend(&kv.value);
        }
        let mut data = Vec::new();
        for t in &self.tensors {
            int(&mut out, &mut fields, t.name.len() as u64, 8);
            out.extend(t.name.as_bytes());
            int(&mut out, &mut fields, t.dims.len() as u64, 4);
            for &d in &t.dims {
                int(&mut out, &mut fields, d, 8);
            }
            int(&mut out, &mut fields, t.kind as u64, 4);
            int(&mut out, &mut fields, data.len() as u64, 8);
            data.extend(&t.data);
            data.resize(data.len().next_multiple_of(32), 0);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend(&data);
        (out, fields)
    }
}

/// A valid llama GGUF of the structure of a real one, scaled down: metadata of every value
/// type, a byte-level BPE vocabulary, float and quantized tensors.
pub fn seed() -> Gguf {
    let tokens = ["a", "b", "ab", "Ġ", "Ġa", "<|im_end|>"].map(s);
    let merges = ["a b", "Ġ a"].map(s);
    let types = [1i32, 1, 1, 1, 1, 3].map(|t| t.to_le_bytes().to_vec());
    let u32v = |v: u32| v.to_le_bytes().to_vec();
    let f32s = |n: usize| {
        (0..n)
            .flat_map(|i| (1.0 + i as f32 * 0.01).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let q = |blocks: usize, bytes: usize| {
        (0..blocks * bytes)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>()
    };
    let mut g = Gguf::default();
    g.kv("general.architecture", STRING, s("llama"))
        .kv("general.alignment", 4, u32v(32))
        .kv("llama.embedding_length", 4, u32v(32))
        .kv("llama.feed_forward_length", 4, u32v(64))
        .kv("llama.block_count", 4, u32v(1))
        .kv("llama.attention.head_count", 4, u32v(2))
        .kv("llama.attention.head_count_kv", 4, u32v(1))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            6,
            1e-5f32.to_le_bytes().to_vec(),
        )
        .kv("llama.rope.freq_base", 6, 1e4f32.to_le_bytes().to_vec())
        .kv("llama.context_length", 10, 2048u64.to_le_bytes().to_vec())
        .kv("general.flag", 7, vec![1])
        .kv("general.f64", 12, 1.5f64.to_le_bytes().to_vec())
        .kv("tokenizer.ggml.model", STRING, s("gpt2"))
        .kv("tokenizer.ggml.pre", STRING, s("smollm"))
        .kv("tokenizer.ggml.tokens", ARRAY, array(STRING, &tokens))
        .kv("tokenizer.ggml.merges", ARRAY, array(STRING, &merges))
        .kv("tokenizer.ggml.token_type", ARRAY, array(5, &types))
        .kv("tokenizer.ggml.eos_token_id", 4, u32v(5))
        .kv("tokenizer.ggml.add_bos_token", 7, vec![0])
        .kv(
            "tokenizer.chat_template",
            STRING,
            s("{% for m in messages %}{{ m.content }}{% endfor %}"),
        );
    g.tensor("token_embd.weight", &[32, 6], 8, q(6, 34))
        .tensor("output_norm.weight", &[32], 0, f32s(32))
        .tensor("blk.0.attn_norm.weight", &[32], 0, f32s(32))
        .tensor("blk.0.ffn_norm.weight", &[32], 0, f32s(32))
        .tensor("blk.0.attn_q.weight", &[32, 32], 3, q(32, 20))
        .tensor("blk.0.attn_k.weight", &[32, 16], 2, q(16, 18))
        .tensor("blk.0.attn_v.weight", &[32, 16], 30, q(16, 64))
        .tensor("blk.0.attn_output.weight", &[32, 32], 1, q(32, 64))
        .tensor("blk.0.ffn_gate.weight", &[256, 8], 12, q(8, 144))
        .tensor("blk.0.ffn_up.weight", &[256, 8], 13, q(8, 176))
        .tensor("blk.0.ffn_down.weight", &[256, 8], 14, q(8, 210));
    g
}

/// Metadata values that break careless readers, by value type.
fn edge_value(rng: &mut Rng, kind: u32) -> Vec<u8> {
    match kind {
        0 | 1 | 7 => vec![*rng.pick(&[0u8, 1, 2, 0x7f, 0x80, 0xff])],
        2 | 3 => bytes::edge_bytes(rng, 2),
        4 | 5 | 10 | 11 => bytes::edge_bytes(rng, if kind >= 10 { 8 } else { 4 }),
        6 => rng
            .pick(&[
                0.0f32,
                -0.0,
                -1.0,
                f32::NAN,
                f32::INFINITY,
                f32::MIN_POSITIVE,
                1e38,
            ])
            .to_le_bytes()
            .to_vec(),
        12 => rng
            .pick(&[0.0f64, -1.0, f64::NAN, f64::NEG_INFINITY, 1e300])
            .to_le_bytes()
            .to_vec(),
        STRING => {
            let names: [&str; 7] = ["", "qwen2", "mistral", "llama", "{{", "bert", "\u{0}"];
            let name = names[rng.below(names.len())];
            s(name)
        }
        _ => {
            let n = rng.below(4);
            array(
                *rng.pick(&[4u32, 5, STRING, ARRAY, 99]),
                &vec![vec![0u8; 8]; n],
            )
        }
    }
}

/// One field-level change of the description.
pub fn mutate_structure(rng: &mut Rng, g: &mut Gguf) {
    let nk = g.kvs.len();
    let nt = g.tensors.len();
    match rng.below(8) {
        0 if nk > 0 => {
            g.kvs.remove(rng.below(nk));
        }
        1 if nk > 0 => {
            let kv = &mut g.kvs[rng.below(nk)];
            kv.value = edge_value(rng, kv.kind);
        }
        2 if nk > 0 => {
            // Same key, another type.
            let kv = &mut g.kvs[rng.below(nk)];
            kv.kind = *rng.pick(&[0, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
            kv.value = edge_value(rng, kv.kind);
        }
        3 if nt > 0 => {
            let t = &mut g.tensors[rng.below(nt)];
            let d = rng.below(t.dims.len());
            t.dims[d] = match rng.below(3) {
                0 => *rng.pick(&bytes::EDGE_INTS),
                1 => t.dims[d] * 2,
                _ => t.dims[d] / 2,
            };
            if rng.one_in(4) {
                t.dims.reverse();
            }
        }
        4 if nt > 0 => {
            let t = &mut g.tensors[rng.below(nt)];
            t.kind = *rng.pick(&[0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 15, 30, 31, 99]);
        }
        5 if nt > 0 => {
            g.tensors.remove(rng.below(nt));
        }
        6 if nt > 0 => {
            let i = rng.below(nt);
            g.tensors[i].name = match rng.below(3) {
                0 => g.tensors[rng.below(nt)].name.clone(),
                1 => "blk.4294967295.ffn_gate.weight".into(),
                _ => "blk.1.ffn_gate.weight".into(),
            };
        }
        _ if nt > 0 => {
            let t = &mut g.tensors[rng.below(nt)];
            let n = t.data.len();
            t.data.truncate(rng.below(n + 1));
        }
        _ => {}
    }
}

/// A mutated GGUF file of `seed`'s structure; `other` a second valid file to splice from.
pub fn mutate(rng: &mut Rng, other: &[u8]) -> Vec<u8> {
    let mut g = seed();
    let structural = rng.below(3) > 0;
    if structural {
        for _ in 0..1 + rng.below(2) {
            mutate_structure(rng, &mut g);
        }
    }
    let (file, fields) = g.write();
    if structural && rng.below(3) > 0 {
        return file;
    }
    bytes::mutate(rng, &file, &fields, other)
}
