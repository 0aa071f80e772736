//! NVRTC compiles every CUDA kernel (kernels/*.cu) for the architectures the CUDA backend
//! targets, to PTX and (the path of a driver older than NVRTC) to CUBINs. Needs libnvrtc and the CUDA headers, no GPU. Where either is missing the tests
//! print `SKIPPED (nvrtc kernels): <why>` and pass, unless `SIRIUS_REQUIRE_NVRTC=1` (CI),
//! which makes that a failure.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::time::Instant;

use sirius_offload::backend::cuda::kernels::{KernelSource, COMMON_HEADER_NAME, KERNELS};
use sirius_offload::backend::cuda::nvrtc;
use sirius_offload::Error;

/// Ampere (A100, RTX 30xx), Ada (RTX 40xx), Hopper.
const ARCHS: [&str; 4] = ["sm_80", "sm_86", "sm_89", "sm_90"];
/// Exact architectures of the CUBIN path (Ampere, Hopper).
const CUBIN_ARCHS: [&str; 2] = ["sm_80", "sm_90"];
const REQUIRE_ENV: &str = "SIRIUS_REQUIRE_NVRTC";

/// The include directories to compile with, or None (after saying why) when NVRTC cannot
/// compile on this machine.
fn nvrtc_or_skip() -> Option<Vec<PathBuf>> {
    let dirs = nvrtc::cuda_include_dirs();
    match nvrtc::probe(&dirs) {
        Ok((major, minor)) => {
            eprintln!("NVRTC {major}.{minor}, CUDA headers from {dirs:?}");
            Some(dirs)
        }
        Err(e) => {
            if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
                panic!("{REQUIRE_ENV}=1 but NVRTC cannot compile here: {e}");
            }
            eprintln!("SKIPPED (nvrtc kernels): {e}");
            None
        }
    }
}

#[test]
fn every_kernel_compiles_cleanly_for_every_arch() {
    let Some(dirs) = nvrtc_or_skip() else {
        return;
    };
    let start = Instant::now();
    let mut failures = Vec::new();
    for kernel in KERNELS {
        for arch in ARCHS {
            let t = Instant::now();
            let ptx = match nvrtc::compile(kernel, arch, &dirs) {
                Ok(ptx) => ptx,
                Err(e) => {
                    failures.push(format!("{} for {arch}: {e}", kernel.file));
                    continue;
                }
            };
            eprintln!(
                "{:>15} {arch}: {:.2} s, {} KiB of PTX",
                kernel.file,
                t.elapsed().as_secs_f64(),
                ptx.ptx.len() / 1024
            );
            let mut got: Vec<&str> = ptx.entries().collect();
            got.sort_unstable();
            let mut want = kernel.functions.to_vec();
            want.sort_unstable();
            if got != want {
                failures.push(format!(
                    "{} for {arch}: the PTX defines {got:?}, KERNELS lists {want:?}",
                    kernel.file
                ));
            }
            let target = format!(".target sm_{}", &arch[3..]);
            if !ptx.ptx.lines().any(|l| l.trim() == target) {
                failures.push(format!(
                    "{} for {arch}: no `{target}` in the PTX",
                    kernel.file
                ));
            }
            if !ptx.log.trim().is_empty() {
                failures.push(format!(
                    "{} for {arch}: NVRTC warnings:\n{}",
                    kernel.file, ptx.log
                ));
            }
        }
    }
    eprintln!(
        "{} kernel files x {} architectures in {:.1} s",
        KERNELS.len(),
        ARCHS.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The CUBIN path (NVRTC a newer minor version than the driver, see `compat`): every kernel
/// file compiles to machine code for the exact architecture, and its image names every
/// kernel the backend looks up.
#[test]
fn every_kernel_compiles_to_a_cubin() {
    let Some(dirs) = nvrtc_or_skip() else {
        return;
    };
    let start = Instant::now();
    let mut failures = Vec::new();
    for kernel in KERNELS {
        for arch in CUBIN_ARCHS {
            let cubin = match nvrtc::compile_cubin(kernel, arch, &dirs) {
                Ok(c) => c,
                Err(e) => {
                    failures.push(format!("{} for {arch}: {e}", kernel.file));
                    continue;
                }
            };
            if cubin.arch != arch || !cubin.cubin.starts_with(b"\x7fELF") {
                failures.push(format!(
                    "{} for {arch}: not an ELF image for {arch} (arch {})",
                    kernel.file, cubin.arch
                ));
            }
            let missing: Vec<&str> = kernel
                .functions
                .iter()
                .copied()
                .filter(|f| !cubin.has_entry(f))
                .collect();
            if !missing.is_empty() || cubin.has_entry("no_such_kernel") {
                failures.push(format!(
                    "{} for {arch}: the CUBIN lacks {missing:?}",
                    kernel.file
                ));
            }
            if !cubin.log.trim().is_empty() {
                failures.push(format!(
                    "{} for {arch}: NVRTC warnings:\n{}",
                    kernel.file, cubin.log
                ));
            }
        }
    }
    eprintln!(
        "{} kernel files x {} CUBIN architectures in {:.1} s",
        KERNELS.len(),
        CUBIN_ARCHS.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_kernel_that_does_not_compile_returns_the_nvrtc_log() {
    let Some(dirs) = nvrtc_or_skip() else {
        return;
    };
    let broken = KernelSource {
        file: "broken.cu",
        source: "#include \"common.cuh\"\nextern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }\n",
        functions: &["broken"],
    };
    match nvrtc::compile(&broken, "sm_80", &dirs) {
        Err(Error::Cuda(msg)) => {
            assert!(
                msg.contains("broken.cu") && msg.contains("undefined_name"),
                "{msg}"
            );
        }
        other => panic!("expected a CUDA compile error, got {other:?}"),
    }
}

/// Needs no NVRTC: the list the backend loads names from matches the kernels directory.
#[test]
fn every_kernel_file_is_listed_once() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("kernels/ is readable")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = KERNELS.iter().map(|k| k.file.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "kernels/*.cu and KERNELS differ");
    let mut names: Vec<&str> = KERNELS
        .iter()
        .flat_map(|k| k.functions.iter().copied())
        .collect();
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), n, "a kernel name is listed twice");
    for k in KERNELS {
        assert!(
            k.source
                .contains(&format!("#include \"{COMMON_HEADER_NAME}\"")),
            "{} does not include {COMMON_HEADER_NAME}",
            k.file
        );
    }
}

#[test]
fn architectures_are_named_as_nvrtc_wants() {
    assert_eq!(nvrtc::virtual_arch("sm_80").unwrap(), "compute_80");
    assert_eq!(nvrtc::virtual_arch("89").unwrap(), "compute_89");
    assert_eq!(nvrtc::virtual_arch("compute_90a").unwrap(), "compute_90a");
    assert_eq!(nvrtc::exact_arch("compute_80").unwrap(), "sm_80");
    assert_eq!(nvrtc::exact_arch("90a").unwrap(), "sm_90a");
    for bad in ["", "sm_", "sm_8", "gfx90a", "sm_80x"] {
        assert!(nvrtc::virtual_arch(bad).is_err(), "{bad:?}");
        assert!(nvrtc::exact_arch(bad).is_err(), "{bad:?}");
    }
}
