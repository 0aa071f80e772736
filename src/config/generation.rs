//! `generation_config.json`: the EOS ids a model stops on (may differ from config.json's).

use std::path::Path;

use crate::error::{Error, Result};

/// Every EOS id from config.json and generation_config.json (absent file = none extra).
pub fn stop_token_ids(dir: &Path, config_eos: &[u32]) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = config_eos.to_vec();
    let path = dir.join("generation_config.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: path.clone(), source })?;
        match json.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|v| v as u32)),
            Some(serde_json::Value::Array(list)) => ids.extend(list.iter().filter_map(|v| v.as_u64()).map(|v| v as u32)),
            _ => {}
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
