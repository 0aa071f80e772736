//! `sirius-offload plan` on the command line: the issue's Done-when (Llama-3-70B in 24G),
//! the JSON contract and clean one-line errors.

mod common;

use common::{assert_one_line_failure, run_bin as run, stderr_of as stderr};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn llama_3_70b_in_24g_explains_bf16_and_shows_a_q4_plan() {
    let o = run(&["plan", "--model", "llama-3-70b", "--gpu-mem", "24G"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = stdout(&o);
    assert!(md.contains("bf16 cannot hold the sparse set"), "{md}");
    // With the driver's context and the allocator margin inside the 24 GiB, no format holds
    // keep 0.5; q4_k holds the largest keep (0.46), with its compact down matrices in 4 bits
    // too, and the advice says what that costs.
    assert!(
        md.contains(
            "# Alternative: q4_k at keep 0.46, compact down in q4_0 (no format holds keep 0.5"
        ),
        "{md}"
    );
    assert!(
        md.contains("## q4_k at keep 0.46 (compact down in q4_0): the sparse set fits"),
        "{md}"
    );
    assert!(md.contains("--griffin-down q4_0"), "{md}");
    for way in ["full (", "reference (", "sirius-offload ("] {
        assert_eq!(md.matches(way).count(), 2, "{way} once per plan: {md}");
    }
    assert!(
        md.contains("tokens/s") && md.contains("Time to first token"),
        "{md}"
    );
    assert!(md.contains("141.1 GB"), "{md}");
}

#[test]
fn json_has_the_contract_keys() {
    let o = run(&[
        "plan",
        "--model",
        "llama-3-70b",
        "--gpu-mem",
        "24GiB",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["fits"], false);
    assert_eq!(json["total_weight_bytes"], 141_110_050_816u64);
    for key in ["resident_bytes", "streamed_bytes_per_verification"] {
        assert!(json[key].as_u64().is_some(), "{key}");
    }
    for way in ["full", "reference", "sirius_offload"] {
        assert!(json["predicted_ms_per_token"][way].as_f64().unwrap() > 0.0);
    }
    assert_eq!(json["plan"]["layers"].as_array().unwrap().len(), 80);
    let alt = &json["alternative"];
    assert_eq!(
        (alt["fits"].as_bool(), alt["format"].as_str()),
        (Some(true), Some("q4_k"))
    );
    assert!(alt["resident_bytes"].as_u64().unwrap() <= 24 << 30);
    let ours = alt["predicted_ms_per_token"]["sirius_offload"]
        .as_f64()
        .unwrap();
    let reference = alt["predicted_ms_per_token"]["reference"].as_f64().unwrap();
    assert!(ours < reference, "{ours} vs {reference}");
}

#[test]
fn a_model_directory_with_only_config_json_plans() {
    let tmp = tempfile::tempdir().unwrap();
    let config = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
        "intermediate_size":96,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"vocab_size":128}"#;
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    let dir = tmp.path().to_str().unwrap();
    let o = run(&[
        "plan",
        "-m",
        dir,
        "--resident-mem",
        "8M",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["fits"], true);
    assert!(json["alternative"].is_null());
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let plan = |extra: &[&str]| {
        let mut args = vec!["plan", "--model", "llama-3-70b"];
        args.extend_from_slice(extra);
        run(&args)
    };
    assert_one_line_failure(&plan(&["--gpu-mem", "24X"]), "24X");
    assert_one_line_failure(&plan(&["--gpu-mem", "2G"]), "minimum");
    assert_one_line_failure(&plan(&["--gpu-mem", "24G", "--keep", "0"]), "--keep");
    assert_one_line_failure(&plan(&["--gpu-mem", "24G", "--aal", "40"]), "--aal");
    let o = run(&["plan", "--model", "no-such-model", "--gpu-mem", "24G"]);
    assert_one_line_failure(&o, "no-such-model");
}

#[test]
fn a_shapes_only_preset_cannot_run_and_says_why() {
    let home = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sirius-offload"))
        .env("SIRIUS_HOME", home.path())
        .env_remove("SIRIUS_LOG")
        .args(["run", "--model", "llama-3-70b", "--prompt", "hi"])
        .output()
        .unwrap();
    assert_one_line_failure(&o, "shapes only");
}

/// `plan` on a GGUF file plans its own formats: SmolLM2's Q4_1 layers and Q8_0 head.
#[test]
fn a_gguf_file_plans_in_its_own_formats() {
    let Some(gguf) = common::smollm2_gguf("plan on a GGUF file") else {
        return;
    };
    let gguf = gguf.to_string_lossy();
    let args = [
        "plan",
        "--model",
        &gguf,
        "--resident-mem",
        "200M",
        "--context",
        "512",
        "--format",
        "json",
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["format"], "q4_1");
    let sizes = &json["plan"]["sizes"];
    // 49152 x 576 in Q8_0: 34 bytes per 32 weights.
    assert_eq!(sizes["head_bytes"], 49152u64 * 576 / 32 * 34);
    // 576 x 576 in Q4_1: 20 bytes per 32 weights.
    assert_eq!(
        sizes["attention_bytes"],
        (576u64 * 576 * 2 + 192 * 576 * 2) / 32 * 20
    );
    // --weights overrides the file's format (and then the head is assumed in it too).
    let o = run(&[&args[..], &["--weights", "q8_0"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["format"], "q8_0");
    assert_eq!(
        json["plan"]["sizes"]["head_bytes"],
        49152u64 * 576 / 32 * 34
    );
}

/// Issue 17's budget truth: `plan --gpu-mem 24G` for Llama-3-70B in 4 bits keeps the driver's
/// context, the allocator margin and the CUDA backend's scratch inside the 24 GiB, as lines
/// `run --gpu-mem` books in its arena under the same names.
#[test]
fn llama_3_70b_q4_in_24g_keeps_the_driver_and_margins_inside_the_budget() {
    let budget = 24u64 << 30;
    for weights in ["q4_k", "q4_0"] {
        let o = run(&[
            "plan",
            "--model",
            "llama-3-70b",
            "--gpu-mem",
            "24G",
            "--weights",
            weights,
            "--format",
            "json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        for plan in [&report["plan"], &report["alternative"]["plan"]] {
            if plan.is_null() {
                continue;
            }
            let lines = plan["budget_lines"].as_array().unwrap();
            let line = |what: &str| {
                lines
                    .iter()
                    .find(|l| l["what"] == what)
                    .and_then(|l| l["bytes"].as_u64())
                    .unwrap_or_else(|| panic!("{weights}: no {what} line in {lines:?}"))
            };
            assert_eq!(line("driver context"), 512 << 20);
            // 256 MiB and 4 MiB per layer.
            assert_eq!(line("allocator margin"), (256 + 80 * 4) << 20);
            // cuBLAS's 32 MiB workspace, the rope table, the bf16 GEMM input copy.
            assert!(line("backend scratch") > 32 << 20);
            let total: u64 = lines.iter().map(|l| l["bytes"].as_u64().unwrap()).sum();
            assert_eq!(total, plan["resident_bytes"].as_u64().unwrap(), "{weights}");
            assert!(total <= budget, "{weights}: {total} > {budget}");
            // The host holds the 4-bit checkpoint once, pinned for DMA, within a 64 GB host.
            let host = &plan["host"];
            assert_eq!(host["bundle_cache_bytes"], 0, "{weights}");
            let pinned = host["pinned_bytes"].as_u64().unwrap();
            assert!(
                pinned < 64_000_000_000 && pinned > 30_000_000_000,
                "{weights}: {pinned}"
            );
        }
    }
    // `auto` is for `run`, which reads the GPU's free memory.
    let o = run(&["plan", "--model", "llama-3-8b", "--gpu-mem", "auto"]);
    assert_one_line_failure(&o, "needs a size");
    // On the CPU there is no driver or allocator line.
    let o = run(&[
        "plan",
        "--model",
        "llama-3-8b",
        "--resident-mem",
        "8G",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let lines = report["plan"]["budget_lines"].as_array().unwrap();
    assert!(
        lines
            .iter()
            .all(|l| l["what"] != "driver context" && l["what"] != "allocator margin"),
        "{lines:?}"
    );
}
