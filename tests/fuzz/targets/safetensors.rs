//! Safetensors checkpoints, single-file or sharded with an index: the header's JSON mutated
//! field by field (dtypes, shapes, offsets), the header length set to edge values, bytes
//! flipped and files cut, the index's `weight_map` mutated; opened by `WeightStore::open_dir`,
//! every tensor fetched and (one case in four) the whole model loaded.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use sirius_offload::backend::CpuBackend;
use sirius_offload::model::weights::WeightStore;
use sirius_offload::model::Llama;
use sirius_offload::tensor::DType;

use crate::common::{
    config_json, random_tensors, safetensors_header_and_data, RawTensor, TinySpec,
};
use crate::fuzz::bytes::{self, Field};
use crate::fuzz::{json as fjson, one_line, Case, Rng, Target, Verdict};

const HEADER_KEYS: &[&str] = &["dtype", "shape", "data_offsets", "__metadata__", "format"];
const INDEX_KEYS: &[&str] = &["weight_map", "metadata", "total_size"];
const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

pub struct Safetensors {
    /// A tiny model's tensors in each float dtype, and its config.json.
    models: Vec<(BTreeMap<String, RawTensor>, Vec<u8>)>,
}

impl Safetensors {
    pub fn new() -> Safetensors {
        let models = ["BF16", "F16", "F32"]
            .into_iter()
            .map(|dtype| {
                let spec = TinySpec {
                    layers: 1,
                    hidden: 16,
                    heads: 2,
                    kv_heads: 1,
                    ffn: 32,
                    vocab: 32,
                    dtype,
                    ..TinySpec::default()
                };
                let mut tensors = random_tensors(&spec, 7);
                // A tensor the model never reads, of a type it cannot compute with.
                tensors.insert(
                    "extra.int8".into(),
                    RawTensor {
                        dtype: "I8",
                        shape: vec![4],
                        data: vec![1, 2, 3, 4],
                    },
                );
                let config = serde_json::to_vec(&config_json(&spec)).unwrap_or_default();
                (tensors, config)
            })
            .collect();
        Safetensors { models }
    }
}

/// The header of `tensors` as JSON, and their data.
fn header_and_data<'a>(
    tensors: impl Iterator<Item = (&'a String, &'a RawTensor)>,
) -> (Value, Vec<u8>) {
    let (mut header, data) = safetensors_header_and_data(tensors);
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    (Value::Object(header), data)
}

/// A safetensors file: header length, header text (padded with spaces), data.
fn file(header: &[u8], data: &[u8], declared_len: Option<u64>) -> Vec<u8> {
    let mut header = header.to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let len = declared_len.unwrap_or(header.len() as u64);
    let mut out = len.to_le_bytes().to_vec();
    out.extend(&header);
    out.extend(data);
    out
}

/// One shard of `tensors`, mutated: its header's JSON, its length field or its bytes.
fn mutated_shard<'a>(
    rng: &mut Rng,
    tensors: impl Iterator<Item = (&'a String, &'a RawTensor)>,
    mutate: bool,
) -> Vec<u8> {
    let (mut header, data) = header_and_data(tensors);
    if !mutate {
        return file(
            &serde_json::to_vec(&header).unwrap_or_default(),
            &data,
            None,
        );
    }
    match rng.below(4) {
        0 | 1 => {
            for _ in 0..1 + rng.below(2) {
                fjson::mutate_tree(rng, &mut header, HEADER_KEYS);
            }
            let text = fjson::to_text(rng, &header);
            let declared = rng.one_in(8).then(|| u64::from_le_bytes(edge8(rng)));
            file(&text, &data, declared)
        }
        2 => {
            let mut data = data;
            data.truncate(rng.below(data.len() + 1));
            file(
                &serde_json::to_vec(&header).unwrap_or_default(),
                &data,
                None,
            )
        }
        _ => {
            let clean = file(
                &serde_json::to_vec(&header).unwrap_or_default(),
                &data,
                None,
            );
            bytes::mutate(rng, &clean, &[Field { at: 0, width: 8 }], &[])
        }
    }
}

fn edge8(rng: &mut Rng) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes::edge_bytes(rng, 8));
    b
}

impl Target for Safetensors {
    const NAME: &'static str = "safetensors";

    fn make(&self, rng: &mut Rng) -> Case {
        let (tensors, config) = rng.pick(&self.models);
        let mut case = Case::one("config.json", config.clone());
        case.deep = rng.one_in(4);
        if rng.one_in(2) {
            let shard = mutated_shard(rng, tensors.iter(), true);
            case.files.push(("model.safetensors".into(), shard));
            return case;
        }
        let half = tensors.len() / 2;
        let parts = [
            tensors.iter().take(half).collect::<Vec<_>>(),
            tensors.iter().skip(half).collect::<Vec<_>>(),
        ];
        let which = rng.below(3);
        for (i, part) in parts.iter().enumerate() {
            let shard = mutated_shard(rng, part.iter().copied(), which == i);
            case.files.push((SHARDS[i].into(), shard));
        }
        let weight_map: serde_json::Map<String, Value> = parts
            .iter()
            .enumerate()
            .flat_map(|(i, part)| {
                part.iter()
                    .map(move |(name, _)| ((*name).clone(), json!(SHARDS[i])))
            })
            .collect();
        let index = json!({"metadata": {"total_size": 1234}, "weight_map": weight_map});
        let index = if which == 2 {
            fjson::mutate(rng, &index, INDEX_KEYS)
        } else {
            serde_json::to_vec(&index).unwrap_or_default()
        };
        case.files
            .push(("model.safetensors.index.json".into(), index));
        case
    }

    fn check(&self, case: &Case, dir: &Path) -> Result<Verdict, String> {
        let culprit = dir.display().to_string();
        let store = match WeightStore::open_dir(dir) {
            Ok(store) => store,
            Err(e) => return one_line(&e.to_string(), &culprit),
        };
        for (name, shape) in store.shapes() {
            match store.get(name, shape) {
                Ok(t) => {
                    let elements: usize = shape.iter().product();
                    if t.bytes().len() != t.dtype.bytes_for(elements)
                        || t.to_f32().len() != elements
                    {
                        return Err(format!(
                            "`{name}` of shape {shape:?} ({}) has {} bytes",
                            t.dtype,
                            t.bytes().len()
                        ));
                    }
                }
                Err(e) => {
                    one_line(&e.to_string(), &culprit)?;
                }
            }
        }
        let _ = store.total_bytes();
        if case.deep {
            if let Err(e) = store.converted(DType::Q8_0) {
                one_line(&e.to_string(), &culprit)?;
            }
            if let Err(e) = Llama::load(dir, CpuBackend::new(1)) {
                one_line(&e.to_string(), &culprit)?;
            }
        }
        Ok(Verdict::Accepted)
    }
}
