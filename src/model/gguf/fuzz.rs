//! What the GGUF fuzz loop found, kept beside the parser. The loop itself is
//! `tests/fuzz_loaders.rs` (`gguf`), which drives every loader's loop the same way: mutated
//! files opened through `ModelFiles`, as `--model x.gguf` opens them.

use std::path::Path;
use std::sync::Arc;

use super::hf::GgufArch;
use super::tests::{string, Writer};
use super::weights::{weight_store, GgufWeights};
use super::GgufFile;

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
