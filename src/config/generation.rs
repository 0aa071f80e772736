//! `generation_config.json`: the EOS ids a model stops on (may differ from config.json's).

use std::path::Path;

use crate::config::model_config::token_ids;
use crate::error::{Error, Result};

/// Every EOS id from config.json and generation_config.json (absent file = none extra).
pub fn stop_token_ids(dir: &Path, config_eos: &[u32]) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = config_eos.to_vec();
    let path = dir.join("generation_config.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
        if let Some(value) = json.get("eos_token_id") {
            ids.extend(token_ids(value, &path, None)?);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
