//! Which kind of code NVRTC must produce for the driver to load it: a pure function of the
//! two versions, so that the rule is tested without a GPU.
//!
//! The driver JIT-compiles PTX only up to the PTX ISA version of its own CUDA release: PTX
//! from an NVRTC newer than the driver fails to load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
//! A CUBIN (machine code for one exact `sm_XX`) needs no JIT, and CUDA's minor-version
//! compatibility lets a driver load the CUBINs of any toolkit of its own major version. So:
//!
//! | NVRTC vs driver (CUDA version)        | code                          |
//! |---------------------------------------|-------------------------------|
//! | older or same (e.g. 12.4 on 12.8)     | PTX for `compute_XX` (JIT)    |
//! | same major, newer minor (12.8 on 12.4)| CUBIN for the exact `sm_XX`   |
//! | newer major (13.0 on 12.x)            | refused: install the NVRTC of the driver's major, or update the driver |

use crate::error::{Error, Result};

/// What NVRTC compiles the kernels to for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeKind {
    /// PTX for the virtual architecture (`compute_XX`), JIT-compiled by the driver on load.
    Ptx,
    /// Machine code for the exact architecture (`sm_XX`), loaded as is.
    Cubin,
}

/// The code NVRTC `nvrtc` (major, minor) must produce for a driver supporting CUDA `driver`
/// (major, minor), or the error that says which library to install.
pub fn code_kind(nvrtc: (u32, u32), driver: (u32, u32)) -> Result<CodeKind> {
    if nvrtc.0 > driver.0 {
        return Err(Error::Cuda(format!(
            "NVRTC {}.{} makes code the NVIDIA driver (CUDA {}.{}) cannot load: install the \
             NVRTC of CUDA {} (pip: nvidia-cuda-nvrtc-cu{}, its lib dir on LD_LIBRARY_PATH) \
             and take libnvrtc.so.{} off the library path (it is tried first), or update the \
             driver to one for CUDA {}.x",
            nvrtc.0, nvrtc.1, driver.0, driver.1, driver.0, driver.0, nvrtc.0, nvrtc.0
        )));
    }
    if nvrtc.0 == driver.0 && nvrtc.1 > driver.1 {
        return Ok(CodeKind::Cubin);
    }
    Ok(CodeKind::Ptx)
}

/// The architecture NVRTC is given for a device of compute capability `cc` and code `kind`:
/// "compute_90" for PTX, "sm_90" for a CUBIN.
pub fn target_arch(kind: CodeKind, cc: (u32, u32)) -> String {
    match kind {
        CodeKind::Ptx => format!("compute_{}{}", cc.0, cc.1),
        CodeKind::Cubin => format!("sm_{}{}", cc.0, cc.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_or_equal_nvrtc_makes_ptx() {
        assert_eq!(code_kind((13, 0), (13, 0)).unwrap(), CodeKind::Ptx);
        assert_eq!(code_kind((12, 4), (12, 8)).unwrap(), CodeKind::Ptx);
        assert_eq!(code_kind((12, 9), (13, 0)).unwrap(), CodeKind::Ptx);
        assert_eq!(code_kind((12, 4), (13, 2)).unwrap(), CodeKind::Ptx);
    }

    #[test]
    fn a_newer_minor_of_the_same_major_makes_a_cubin() {
        assert_eq!(code_kind((12, 8), (12, 4)).unwrap(), CodeKind::Cubin);
        assert_eq!(code_kind((13, 2), (13, 0)).unwrap(), CodeKind::Cubin);
    }

    #[test]
    fn a_newer_major_is_refused_naming_both_versions_and_the_fix() {
        let msg = code_kind((13, 0), (12, 4)).unwrap_err().to_string();
        for want in [
            "NVRTC 13.0",
            "CUDA 12.4",
            "nvidia-cuda-nvrtc-cu12",
            "update the driver",
        ] {
            assert!(msg.contains(want), "{want:?} not in {msg}");
        }
    }

    #[test]
    fn targets_name_the_virtual_or_exact_architecture() {
        assert_eq!(target_arch(CodeKind::Ptx, (9, 0)), "compute_90");
        assert_eq!(target_arch(CodeKind::Cubin, (8, 6)), "sm_86");
    }
}
