//! `run --device`: on a machine without a usable GPU (or a build without the `cuda` feature)
//! `--device cuda` fails before any model is loaded, with one line that says what to do and
//! no panic. Self-contained (no model needed): the device check comes first.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    run_with(args, None)
}

/// `gemm`: the value of SIRIUS_CUDA_GEMM, otherwise removed.
fn run_with(args: &[&str], gemm: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sirius-offload"));
    cmd.env_remove("SIRIUS_LOG");
    match gemm {
        Some(v) => cmd.env("SIRIUS_CUDA_GEMM", v),
        None => cmd.env_remove("SIRIUS_CUDA_GEMM"),
    };
    match cmd.args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot start the binary: {e}"),
    }
}

/// Whether this test binary's build can reach a driver at all (then the GPU path applies).
fn driver_present() -> bool {
    #[cfg(feature = "cuda")]
    return sirius_offload::backend::cuda::device::driver_present();
    #[cfg(not(feature = "cuda"))]
    return false;
}

/// The model does not exist: if the device check did not come first, the error would say so.
const ARGS: &[&str] = &[
    "run",
    "--model",
    "/nonexistent/model",
    "--no-fetch",
    "--prompt",
    "hi",
];

fn device_run(device: &str) -> (Output, String) {
    let mut args = ARGS.to_vec();
    args.extend(["--device", device]);
    let o = run(&args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, err)
}

#[test]
fn device_cuda_fails_with_one_line_and_no_panic() {
    let (o, err) = device_run("cuda");
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    if !cfg!(feature = "cuda") || !driver_present() {
        assert!(err.contains("--device cpu"), "should say what to do: {err}");
    }
    if !cfg!(feature = "cuda") {
        assert!(
            err.contains("built without CUDA support") && err.contains("--features cuda"),
            "{err}"
        );
    } else if !driver_present() {
        assert!(err.contains("no NVIDIA driver found (libcuda.so)"), "{err}");
    } else {
        // A driver exists: the probe ran and either failed (driver/device error) or the
        // backend started and the missing model stopped the run; one line either way.
        eprintln!("libcuda loads here, so `--device cuda` said: {err}");
    }
    assert!(o.stdout.is_empty(), "nothing on stdout expected");
}

#[test]
fn device_cuda_n_takes_the_same_path() {
    let (o, err) = device_run("cuda:1");
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
}

#[test]
fn device_cpu_is_the_default_and_proceeds_to_the_model() {
    // Past the device check, the missing model is the error.
    for extra in [&[][..], &["--device", "cpu"][..]] {
        let mut args = ARGS.to_vec();
        args.extend(extra);
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("CUDA"), "cpu must not touch CUDA: {err}");
        assert!(err.contains("/nonexistent/model"), "{err}");
    }
}

#[test]
fn unknown_devices_are_refused_by_the_parser() {
    for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
        let (o, err) = device_run(bad);
        assert!(!o.status.success(), "{bad}: {err}");
        assert!(err.contains("expected cpu, cuda or cuda:N"), "{bad}: {err}");
    }
}

/// SIRIUS_CUDA_GEMM is read when the CUDA backend is made, before the device probe: a bad
/// value is one line naming the variable and its values, with or without a GPU. `--device
/// cpu` never reads it.
#[cfg(feature = "cuda")]
#[test]
fn a_bad_cuda_gemm_precision_is_one_line_naming_the_variable() {
    let mut args = ARGS.to_vec();
    args.extend(["--device", "cuda"]);
    for bad in ["fp8", "", "BF16"] {
        let o = run_with(&args, Some(bad));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{bad:?}: {err}");
        assert!(!err.contains("panicked"), "{bad:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{bad:?}: {err}");
        assert!(
            err.contains("SIRIUS_CUDA_GEMM") && err.contains("`bf16`") && err.contains("`f32`"),
            "{bad:?}: {err}"
        );
    }
    let mut cpu = ARGS.to_vec();
    cpu.extend(["--device", "cpu"]);
    let err = String::from_utf8_lossy(&run_with(&cpu, Some("fp8")).stderr).into_owned();
    assert!(!err.contains("SIRIUS_CUDA_GEMM"), "{err}");
    assert!(err.contains("/nonexistent/model"), "{err}");
}
