//! The GGUF reader's fuzz loop: a small but complete llama GGUF (metadata of every value
//! type, a byte-level BPE vocabulary, float and quantized tensors) mutated a million ways
//! (bytes flipped, runs overwritten with extreme integers, cuts, insertions, splices), each
//! result parsed and, when it parses, turned into the config, tokenizer, chat template, stop
//! ids and (every 64th) the weight store. Nothing may panic; every failure is an error.
//!
//! `SIRIUS_FUZZ_CASES=N` runs N cases (default 1,000,000 in optimized builds, 50,000 in
//! debug ones, where it is ~30x slower).

use std::path::Path;
use std::sync::Arc;

use super::hf::{self, GgufArch};
use super::tests::{string, Writer};
use super::weights::{weight_store, GgufWeights};
use super::GgufFile;

/// A valid file with the structure of a real llama GGUF, scaled down.
fn seed() -> Vec<u8> {
    let s = |v: &str| {
        let mut b = Vec::new();
        string(&mut b, v);
        b
    };
    let array = |kind: u32, items: &[Vec<u8>]| {
        let mut b = kind.to_le_bytes().to_vec();
        b.extend((items.len() as u64).to_le_bytes());
        items.iter().for_each(|i| b.extend(i));
        b
    };
    let tokens = ["a", "b", "ab", "Ġ", "Ġa", "<|im_end|>"].map(&s);
    let merges = ["a b", "Ġ a"].map(&s);
    let types = [1i32, 1, 1, 1, 1, 3].map(|t| t.to_le_bytes().to_vec());
    let u32v = |v: u32| v.to_le_bytes();
    let mut w = Writer::default();
    w.kv("general.architecture", 8, &s("llama"))
        .kv("general.alignment", 4, &u32v(32))
        .kv("llama.embedding_length", 4, &u32v(32))
        .kv("llama.feed_forward_length", 4, &u32v(64))
        .kv("llama.block_count", 4, &u32v(1))
        .kv("llama.attention.head_count", 4, &u32v(2))
        .kv("llama.attention.head_count_kv", 4, &u32v(1))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            6,
            &1e-5f32.to_le_bytes(),
        )
        .kv("llama.rope.freq_base", 6, &1e4f32.to_le_bytes())
        .kv("llama.context_length", 10, &2048u64.to_le_bytes())
        .kv("general.flag", 7, &[1])
        .kv("general.f64", 12, &1.5f64.to_le_bytes())
        .kv("tokenizer.ggml.model", 8, &s("gpt2"))
        .kv("tokenizer.ggml.pre", 8, &s("smollm"))
        .kv("tokenizer.ggml.tokens", 9, &array(8, &tokens))
        .kv("tokenizer.ggml.merges", 9, &array(8, &merges))
        .kv("tokenizer.ggml.token_type", 9, &array(5, &types))
        .kv("tokenizer.ggml.eos_token_id", 4, &u32v(5))
        .kv("tokenizer.ggml.add_bos_token", 7, &[0])
        .kv(
            "tokenizer.chat_template",
            8,
            &s("{% for m in messages %}{{ m.content }}{% endfor %}"),
        );
    let f32s = |n: usize| {
        (0..n)
            .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let q = |blocks: usize, bytes: usize| {
        (0..blocks * bytes)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>()
    };
    w.tensor("token_embd.weight", &[32, 6], 8, &q(6, 34))
        .tensor("output_norm.weight", &[32], 0, &f32s(32))
        .tensor("blk.0.attn_norm.weight", &[32], 0, &f32s(32))
        .tensor("blk.0.ffn_norm.weight", &[32], 0, &f32s(32))
        .tensor("blk.0.attn_q.weight", &[32, 32], 3, &q(32, 20))
        .tensor("blk.0.attn_k.weight", &[32, 16], 2, &q(16, 18))
        .tensor("blk.0.attn_v.weight", &[32, 16], 30, &q(16, 64))
        .tensor("blk.0.attn_output.weight", &[32, 32], 1, &q(32, 64))
        .tensor("blk.0.ffn_gate.weight", &[256, 8], 12, &q(8, 144))
        .tensor("blk.0.ffn_up.weight", &[256, 8], 13, &q(8, 176))
        .tensor("blk.0.ffn_down.weight", &[256, 8], 14, &q(8, 210));
    w.bytes()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Integers that break careless size arithmetic.
const EXTREMES: [u64; 8] = [0, 1, 0x7f, 0xff, 0xffff_ffff, 1 << 32, 1 << 62, u64::MAX];

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(b.len());
        match rng.below(6) {
            0 => b[at] = rng.next() as u8,
            1 => b[at] ^= 1 << rng.below(8),
            2 => {
                let v = EXTREMES[rng.below(EXTREMES.len())].to_le_bytes();
                let n = [1, 2, 4, 8][rng.below(4)].min(b.len() - at);
                b[at..at + n].copy_from_slice(&v[..n]);
            }
            3 => b.truncate(at),
            4 => {
                let extra: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                b.splice(at..at, extra);
            }
            _ => {
                let from = rng.below(other.len());
                let n = rng.below(64).min(other.len() - from).min(b.len() - at);
                b[at..at + n].copy_from_slice(&other[from..from + n]);
            }
        }
        if b.is_empty() {
            break;
        }
    }
    b
}

/// What the loader does with a parsed file, short of computing with it.
fn use_file(path: &Path, file: &GgufFile, bytes: &[u8], with_weights: bool) {
    let Ok(arch) = GgufArch::of(file) else { return };
    let _ = hf::config_json(file, arch, 6);
    if let Ok(tok) = hf::tokenizer_json(file) {
        let _ = crate::model::Tokenizer::from_json(&tok.to_string(), path);
    }
    let _ = hf::tokenizer_config_json(file);
    let _ = hf::stop_ids(file);
    if with_weights {
        let Ok(mut map) = memmap2::MmapOptions::new()
            .len(bytes.len().max(1))
            .map_anon()
        else {
            return;
        };
        map[..bytes.len()].copy_from_slice(bytes);
        let Ok(map) = map.make_read_only() else {
            return;
        };
        let map = Arc::new(map);
        for mode in [
            GgufWeights::Native,
            GgufWeights::Convert(crate::tensor::DType::BF16),
        ] {
            let _ = weight_store(path, file, &map, arch, (2, 1), mode);
        }
    }
}

#[test]
fn a_million_mutated_files_never_panic() {
    let default = if cfg!(debug_assertions) {
        50_000
    } else {
        1_000_000
    };
    let cases: usize = std::env::var("SIRIUS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let seed = seed();
    let path = Path::new("fuzz.gguf");
    let file = GgufFile::parse(path, &seed).expect("the seed parses");
    let tok = hf::tokenizer_json(&file).expect("the seed's tokenizer");
    crate::model::Tokenizer::from_json(&tok.to_string(), path).expect("the seed's tokenizer loads");
    let other = super::tests::sample();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (mut parsed, mut errors) = (0usize, 0usize);
    for case in 0..cases {
        let bytes = mutate(&mut rng, &seed, &other);
        match GgufFile::parse(path, &bytes) {
            Ok(file) => {
                parsed += 1;
                use_file(path, &file, &bytes, case % 64 == 0);
            }
            Err(e) => {
                errors += 1;
                assert!(
                    e.to_string().contains("fuzz.gguf"),
                    "an error names the file: {e}"
                );
            }
        }
    }
    eprintln!("GGUF fuzz: {cases} cases, {parsed} parsed, {errors} errors, 0 panics");
    assert_eq!(parsed + errors, cases);
    assert!(
        parsed > cases / 100 && errors > cases / 100,
        "mutations should hit both outcomes"
    );
}

/// Found by the loop: an empty tensor with a huge other dimension passed every size check
/// and asked for a 2^50-byte row buffer.
#[test]
fn an_empty_tensor_is_an_error_not_a_huge_allocation() {
    let mut arch = Vec::new();
    string(&mut arch, "llama");
    let bytes = Writer::default()
        .kv("general.architecture", 8, &arch)
        .tensor("blk.0.attn_q.weight", &[1 << 48, 0], 0, &[])
        .bytes();
    let path = Path::new("empty.gguf");
    let file = GgufFile::parse(path, &bytes).expect("an empty tensor is well-formed GGUF");
    let mut map = memmap2::MmapOptions::new()
        .len(bytes.len())
        .map_anon()
        .unwrap();
    map.copy_from_slice(&bytes);
    let map = Arc::new(map.make_read_only().unwrap());
    for mode in [
        GgufWeights::Native,
        GgufWeights::Convert(crate::tensor::DType::BF16),
    ] {
        let err = weight_store(path, &file, &map, GgufArch::Llama, (2, 1), mode)
            .err()
            .unwrap();
        assert!(err.to_string().contains("is empty"), "{err}");
    }
}
