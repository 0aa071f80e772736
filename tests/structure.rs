//! The shape of the code, checked: modules import only the layers below them (the picture
//! in README.md's "Layout" section is the one statement of the allowed directions: this test
//! reads it from there), no file under src/ is over 600 lines, and no function is over 80
//! lines unless a `// Long function: <why>` comment right above it says why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 80;
const LONG_FN_MARKER: &str = "// Long function:";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The layers of README.md's fenced `layers` block, top first: each line lists the modules
/// of one layer (separated by `|`); a module may use only modules of lower lines.
fn layers() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let block = readme
        .split("```layers\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README.md has a ```layers block in its Layout section");
    block
        .lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .filter(|line| !line.trim().is_empty())
        .map(|line| line.split('|').map(|m| m.trim().to_string()).collect())
        .collect()
}

/// `text` without comments and string literals (so that docs and messages that mention a
/// module do not count as using it).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i..].starts_with(b"r#\"") {
            // Raw strings hold quotes; they end at `"#`.
            i += 3;
            while i < b.len() && !b[i..].starts_with(b"\"#") {
                i += 1;
            }
            i += 2;
        } else if b[i..].starts_with(b"'\"'") {
            i += 3;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The top-level modules `code` names through `crate::`, grouped imports
/// (`crate::{a::X, b::{Y, Z}}`) included.
fn used_modules(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + 7..];
        let Some(group) = rest.strip_prefix('{') else {
            out.push(ident(rest));
            continue;
        };
        // Each top-level item of the group starts after the `{` or a `,` at depth 0.
        let mut depth = 0;
        let mut item_start = Some(0);
        for (i, c) in group.char_indices() {
            if let Some(start) = item_start.take() {
                out.push(ident(&group[start..]));
            }
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = Some(i + 1),
                _ => {}
            }
        }
    }
    out.retain(|name| !name.is_empty());
    out
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let layers = layers();
    let n = layers.len();
    let rank: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, layer)| layer.iter().map(move |m| (m.as_str(), n - i)))
        .collect();
    let src = root().join("src");
    let mut broken = Vec::new();
    let mut unplaced = Vec::new();
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        // The crate root and the binary declare and dispatch; they are above every layer.
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(&own) = rank.get(module.as_str()) else {
            unplaced.push(module);
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for used in used_modules(&code_only(&text)) {
            if used == module {
                continue;
            }
            match rank.get(used.as_str()) {
                Some(&r) if r < own => {}
                Some(_) => broken.push(format!("{} uses crate::{used}", rel.display())),
                None => unplaced.push(used),
            }
        }
    }
    unplaced.sort();
    unplaced.dedup();
    assert!(
        unplaced.is_empty(),
        "modules missing from README.md's layers block: {unplaced:?}"
    );
    broken.sort();
    broken.dedup();
    assert!(
        broken.is_empty(),
        "imports that point up or sideways (README.md, Layout, says which way they may point):\n{}",
        broken.join("\n")
    );
}

#[test]
fn no_source_file_is_over_600_lines() {
    let src = root().join("src");
    let long: Vec<String> = rust_files(&src)
        .into_iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(&f).unwrap().lines().count();
            (n > MAX_FILE_LINES).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these files:\n{}", long.join("\n"));
}

/// `(name, first line, lines)` of every function with a body in rustfmt-formatted `text`:
/// from its `fn` line to the closing brace at the same indentation.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let trimmed = code.trim_start();
        let Some(at) = trimmed.find("fn ") else {
            continue;
        };
        let head = &trimmed[..at];
        let qualifiers = [
            "pub",
            "pub(crate)",
            "pub(super)",
            "const",
            "unsafe",
            "async",
        ];
        if !head.split_whitespace().all(|w| qualifiers.contains(&w)) {
            continue;
        }
        let name: String = trimmed[at + 3..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let indent = &code[..code.len() - trimmed.len()];
        // The signature ends at a line ending in `{` (a body) or `;` (a declaration).
        let Some(end) = (i..lines.len()).find(|&j| {
            let t = lines[j].split("//").next().unwrap_or("").trim_end();
            t.ends_with('{') || t.ends_with(';') || t.ends_with('}')
        }) else {
            continue;
        };
        let last = lines[end].split("//").next().unwrap_or("").trim_end();
        if !last.ends_with('{') {
            continue;
        }
        let close = format!("{indent}}}");
        if let Some(k) = (end + 1..lines.len()).find(|&k| lines[k] == close) {
            out.push((name, i, k - i + 1));
        }
    }
    out
}

#[test]
fn no_function_is_over_80_lines_without_a_reason() {
    let src = root().join("src");
    let mut long = Vec::new();
    for file in rust_files(&src) {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (name, first, n) in functions(&text) {
            // The marker sits in the comment lines and attributes right above the function.
            let explained = lines[..first]
                .iter()
                .rev()
                .take_while(|l| {
                    let t = l.trim_start();
                    t.starts_with("//") || t.starts_with("#[")
                })
                .any(|l| l.trim_start().starts_with(LONG_FN_MARKER));
            if n > MAX_FN_LINES && !explained {
                long.push(format!(
                    "{}:{} {name}: {n} lines",
                    file.display(),
                    first + 1
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these functions, or say why not in a `{LONG_FN_MARKER}` comment above them:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_check() {
    // The helpers themselves, on small samples: a broken helper would pass everything.
    let code = code_only("use crate::model::Llama; // crate::engine\nlet s = \"crate::cli\";");
    assert_eq!(used_modules(&code), ["model"]);
    let grouped = "use crate::{engine::{A, B}, model, units::x};";
    assert_eq!(used_modules(grouped), ["engine", "model", "units"]);
    let f = functions("fn a() {\n    x;\n}\n    pub fn b(\n        y: u8,\n    ) -> u8 {\n        y\n    }\nfn c();\n");
    assert_eq!(
        f,
        [("a".to_string(), 0, 3), ("b".to_string(), 3, 5)],
        "{f:?}"
    );
    assert!(layers().len() >= 5, "{:?}", layers());
}
