//! Text inputs shared by subcommands (`calibrate`, `eval`).

use std::path::Path;

use crate::error::{Error, Result};

/// Reads a UTF-8 text file that must hold more than white space. A leading byte-order mark
/// (editors on Windows write one) is dropped, so it cannot hide the first line's JSON.
pub fn read_text(flag: &str, path: &Path) -> Result<String> {
    let mut text = std::fs::read_to_string(path)
        .map_err(|e| Error::InvalidArgument(format!("{flag} {}: {e}", path.display())))?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    if text.trim().is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{flag} {}: the file is empty",
            path.display()
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_order_mark_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bom.jsonl");
        std::fs::write(&path, "\u{feff}{\"question\": \"q\"}\n").unwrap();
        assert_eq!(
            read_text("--data", &path).unwrap(),
            "{\"question\": \"q\"}\n"
        );
        std::fs::write(&path, "\u{feff} \n").unwrap();
        assert!(
            read_text("--data", &path).is_err(),
            "only a mark and white space"
        );
    }
}
