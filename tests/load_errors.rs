//! Every bad input the loader can meet gives a typed error naming the file or tensor, never a
//! panic.

mod common;

use common::{random_tensors, write_model, write_model_with, RawTensor, TinySpec};
use sirius_offload::backend::CpuBackend;
use sirius_offload::model::Llama;
use sirius_offload::Error;

fn load(dir: &std::path::Path) -> Result<Llama<CpuBackend>, Error> {
    Llama::load(dir, CpuBackend::new(1))
}

fn message(r: Result<Llama<CpuBackend>, Error>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_valid_tiny_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model(tmp.path(), &TinySpec::default(), 1);
    let model = load(&dir).unwrap();
    assert_eq!(model.config.num_layers, 2);
}

#[test]
fn missing_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model(tmp.path(), &TinySpec::default(), 1);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let msg = message(load(&dir));
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn missing_weights_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model(tmp.path(), &TinySpec::default(), 1);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let msg = message(load(&dir));
    assert!(
        msg.contains("model.safetensors") && msg.contains("index.json"),
        "{msg}"
    );
}

#[test]
fn bad_json_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model(tmp.path(), &TinySpec::default(), 1);
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 32,").unwrap();
    let err = load(&dir).err().unwrap();
    assert!(matches!(err, Error::Json { .. }), "{err}");
    assert!(err.to_string().contains("config.json"));
}

#[test]
fn unknown_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        arch: "FalconForCausalLM",
        ..TinySpec::default()
    };
    let dir = write_model(tmp.path(), &spec, 1);
    let msg = message(load(&dir));
    assert!(
        msg.contains("FalconForCausalLM") && msg.contains("supported"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let mut tensors = random_tensors(&spec, 1);
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    let dir = write_model_with(tmp.path(), &spec, tensors);
    let msg = message(load(&dir));
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let mut tensors = random_tensors(&spec, 1);
    let bad = tensors
        .get_mut("model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    bad.shape = vec![bad.shape[1], bad.shape[0]];
    let dir = write_model_with(tmp.path(), &spec, tensors);
    let msg = message(load(&dir));
    assert!(
        msg.contains("k_proj") && msg.contains("[32, 16]") && msg.contains("expected [16, 32]"),
        "{msg}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let mut tensors = random_tensors(&spec, 1);
    let n = 32 * 48;
    tensors.insert(
        "model.layers.0.mlp.gate_proj.weight".into(),
        RawTensor {
            dtype: "I8",
            shape: vec![48, 32],
            data: vec![0u8; n],
        },
    );
    let dir = write_model_with(tmp.path(), &spec, tensors);
    let msg = message(load(&dir));
    assert!(
        msg.contains("gate_proj") && msg.contains("I8") && msg.contains("BF16"),
        "{msg}"
    );
}

#[test]
fn mixed_matrix_dtypes_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let mut tensors = random_tensors(&spec, 1);
    let t = tensors
        .get_mut("model.layers.0.self_attn.o_proj.weight")
        .unwrap();
    t.dtype = "F16";
    let msg = message(load(&write_model_with(tmp.path(), &spec, tensors)));
    assert!(
        msg.contains("o_proj") && msg.contains("f16") && msg.contains("bf16"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model(tmp.path(), &TinySpec::default(), 1);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let msg = message(load(&dir));
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
    // Cut inside the header too.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let msg = message(load(&dir));
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn sharded_checkpoints_load_and_missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let tensors = random_tensors(&spec, 3);
    let dir = write_model_with(tmp.path(), &spec, random_tensors(&spec, 3));
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    // Split the tensors over two shards with an index.
    let mut shards = [
        std::collections::BTreeMap::new(),
        std::collections::BTreeMap::new(),
    ];
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), file.into());
        shards[i % 2].insert(name, t);
    }
    for (i, shard) in shards.iter().enumerate() {
        let file = dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        std::fs::write(file, common::safetensors_bytes(shard)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let model = load(&dir).unwrap();
    assert_eq!(model.config.hidden_size, 32);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let msg = message(load(&dir));
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
    // An index may not point outside the model directory.
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "../outside.safetensors"}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let msg = message(load(&dir));
    assert!(
        msg.contains("../outside.safetensors") && msg.contains("not a file name"),
        "{msg}"
    );
}

#[test]
fn unused_tensors_of_other_dtypes_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let mut tensors = random_tensors(&spec, 1);
    tensors.insert(
        "model.rotary_emb.step".into(),
        RawTensor {
            dtype: "I64",
            shape: vec![1],
            data: vec![0u8; 8],
        },
    );
    load(&write_model_with(tmp.path(), &spec, tensors)).unwrap();
}
