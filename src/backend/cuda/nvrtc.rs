//! Run-time compilation of the kernels with NVRTC: to PTX for a virtual architecture
//! (`compute_XX`) that the driver then JIT-compiles for the device it loads the module on, or,
//! when NVRTC is a newer minor version of the driver's CUDA major (whose PTX the driver cannot
//! JIT), to a CUBIN for the device's exact `sm_XX` ([`super::compat`] decides; an NVRTC of a
//! newer major than the driver is refused with what to install).
//!
//! cudarc (built with its `cuda-13000` bindings) tries libnvrtc.so, libnvrtc.so.13, then
//! libnvrtc.so.12: NVRTC 12 and 13 both load. With both on the library path the 13 one wins,
//! which a CUDA 12 driver cannot use (the error says so).
//!
//! cudarc loads libnvrtc with dlopen on first use and panics when it is missing, so every
//! entry point here checks for the library first and returns [`Error::Cuda`] with what to
//! install instead. The NVRTC calls go through cudarc's `sys` layer directly (not its safe
//! wrapper, which unwraps): errors and the compiler log come back as values.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use super::compat::{target_arch, CodeKind};
use super::kernels::{KernelSource, COMMON_HEADER, COMMON_HEADER_NAME};
use crate::error::{Error, Result};

/// Directories (`:`-separated) searched for the CUDA headers (`cuda_bf16.h`), before any
/// well-known place.
pub const INCLUDE_DIR_ENV: &str = "CUDA_INCLUDE_DIR";
/// The header whose presence marks a usable include directory.
const MARKER_HEADER: &str = "cuda_bf16.h";
const NVRTC_HINT: &str = "install the NVRTC of your driver's CUDA major version (pip: \
     nvidia-cuda-nvrtc==13.0.88 for a CUDA 13 driver, nvidia-cuda-nvrtc-cu12 for a CUDA 12 \
     one) and put its lib dir on LD_LIBRARY_PATH";
const HEADER_HINT: &str = "install the CUDA headers of NVRTC's version (pip: \
     nvidia-cuda-runtime==13.0.96, include dir site-packages/nvidia/cu13/include; for CUDA 12 \
     nvidia-cuda-runtime-cu12, site-packages/nvidia/cuda_runtime/include) and set \
     CUDA_INCLUDE_DIR to it, or point it at a CUDA toolkit's";

/// PTX of one kernel file for one architecture.
#[derive(Debug, Clone)]
pub struct Ptx {
    pub file: &'static str,
    /// The virtual architecture compiled for, e.g. "compute_80".
    pub arch: String,
    pub ptx: String,
    /// NVRTC's messages (warnings); empty for a clean compile.
    pub log: String,
}

impl Ptx {
    /// Whether the module defines the kernel `name` (an `.entry` of the PTX).
    pub fn has_entry(&self, name: &str) -> bool {
        self.entries().any(|e| e == name)
    }

    /// The kernels (`.entry` names) the module defines.
    pub fn entries(&self) -> impl Iterator<Item = &str> {
        self.ptx.lines().filter_map(|line| {
            let rest = line.trim_start().strip_prefix(".visible .entry ")?;
            rest.split(|c: char| c == '(' || c.is_whitespace()).next()
        })
    }

    /// The PTX in the form cudarc's module loader takes.
    pub fn to_cudarc(&self) -> cudarc::nvrtc::Ptx {
        cudarc::nvrtc::Ptx::from_src(self.ptx.clone())
    }
}

/// A CUBIN of one kernel file for one exact architecture.
#[derive(Debug, Clone)]
pub struct Cubin {
    pub file: &'static str,
    /// The architecture compiled for, e.g. "sm_80".
    pub arch: String,
    /// The ELF image the driver loads.
    pub cubin: Vec<u8>,
    /// NVRTC's messages (warnings); empty for a clean compile.
    pub log: String,
}

impl Cubin {
    /// Whether the image names the kernel `name`: its ELF string table holds each kernel's
    /// symbol as a NUL-delimited string (a check of the compile, not a full ELF parse).
    pub fn has_entry(&self, name: &str) -> bool {
        let mut needle = Vec::with_capacity(name.len() + 2);
        needle.push(0);
        needle.extend_from_slice(name.as_bytes());
        needle.push(0);
        self.cubin.windows(needle.len()).any(|w| w == needle)
    }
}

/// One kernel file compiled for one device: PTX or a CUBIN, as [`super::compat`] decides.
#[derive(Debug, Clone)]
pub enum Compiled {
    Ptx(Ptx),
    Cubin(Cubin),
}

impl Compiled {
    pub fn file(&self) -> &'static str {
        match self {
            Compiled::Ptx(p) => p.file,
            Compiled::Cubin(c) => c.file,
        }
    }

    pub fn has_entry(&self, name: &str) -> bool {
        match self {
            Compiled::Ptx(p) => p.has_entry(name),
            Compiled::Cubin(c) => c.has_entry(name),
        }
    }

    /// The image as cuModuleLoadData takes it: PTX NUL-terminated, a CUBIN as is.
    pub fn image(&self) -> Result<Vec<u8>> {
        match self {
            Compiled::Ptx(p) => CString::new(p.ptx.as_str())
                .map(CString::into_bytes_with_nul)
                .map_err(|_| Error::Cuda(format!("the PTX of {} contains a NUL byte", p.file))),
            Compiled::Cubin(c) => Ok(c.cubin.clone()),
        }
    }
}

/// Makes sure libnvrtc can be loaded before any cudarc NVRTC call (which would panic).
pub fn ensure_nvrtc() -> Result<()> {
    // SAFETY: only tries to dlopen cudarc's candidate names for libnvrtc.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    let names = cudarc::get_lib_name_candidates("nvrtc").join(", ");
    Err(Error::Cuda(format!(
        "libnvrtc not found (looked for {names}): {NVRTC_HINT}"
    )))
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    status
        .result()
        .map_err(|e| Error::Cuda(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major, minor))
}

/// Where to look for the CUDA headers the kernels include (`cuda_bf16.h`, `cuda_fp16.h`):
/// the directories of `$CUDA_INCLUDE_DIR` if it is set (as given, so that an error can name
/// them); otherwise those of the following that hold the headers: `$CUDA_HOME/include`,
/// `$CUDA_PATH/include`, the `include` beside each `lib` directory on `LD_LIBRARY_PATH`
/// (the pip wheels' `nvidia/cu13/{lib,include}`), /usr/local/cuda/include, /opt/cuda/include,
/// /usr/include.
pub fn cuda_include_dirs() -> Vec<PathBuf> {
    if let Some(v) = std::env::var_os(INCLUDE_DIR_ENV).filter(|v| !v.is_empty()) {
        return std::env::split_paths(&v).collect();
    }
    let mut candidates = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(v).join("include"));
        }
    }
    if let Some(v) = std::env::var_os("LD_LIBRARY_PATH") {
        for lib in std::env::split_paths(&v) {
            if let Some(parent) = lib.parent() {
                candidates.push(parent.join("include"));
            }
        }
    }
    for dir in [
        "/usr/local/cuda/include",
        "/opt/cuda/include",
        "/usr/include",
    ] {
        candidates.push(PathBuf::from(dir));
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for dir in candidates {
        if has_cuda_headers(&dir) && !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// Checks that `include_dirs` provide the CUDA headers.
pub fn check_headers(include_dirs: &[PathBuf]) -> Result<()> {
    if include_dirs.iter().any(|d| has_cuda_headers(d)) {
        return Ok(());
    }
    let looked = if include_dirs.is_empty() {
        "no include directory found".to_string()
    } else {
        format!(
            "not in {}",
            include_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Err(Error::Cuda(format!(
        "{MARKER_HEADER} not found ({looked}): {HEADER_HINT}"
    )))
}

/// The virtual architecture for `arch` given as "sm_80", "compute_80" or "80" (suffixes
/// such as "90a" kept).
pub fn virtual_arch(arch: &str) -> Result<String> {
    Ok(format!("compute_{}", arch_digits(arch)?))
}

/// The exact (real) architecture for `arch` given as "sm_80", "compute_80" or "80": "sm_80".
pub fn exact_arch(arch: &str) -> Result<String> {
    Ok(format!("sm_{}", arch_digits(arch)?))
}

/// "80" (or "90a") from "sm_80", "compute_80" or "80".
fn arch_digits(arch: &str) -> Result<&str> {
    let digits = arch
        .strip_prefix("sm_")
        .or_else(|| arch.strip_prefix("compute_"))
        .unwrap_or(arch);
    let num_len = digits.chars().take_while(char::is_ascii_digit).count();
    let suffix = &digits[num_len..];
    if num_len < 2 || !(suffix.is_empty() || suffix == "a" || suffix == "f") {
        return Err(Error::InvalidArgument(format!(
            "GPU architecture {arch:?}: expected sm_XY, compute_XY or XY (e.g. sm_80)"
        )));
    }
    Ok(digits)
}

/// Checks that NVRTC can compile here at all: the library, the headers, and NVRTC's own
/// builtins library (loaded by libnvrtc on first compile). Returns NVRTC's version.
/// Failing this is a matter of installation, not of the kernels.
pub fn probe(include_dirs: &[PathBuf]) -> Result<(i32, i32)> {
    const PROBE: KernelSource = KernelSource {
        file: "probe.cu",
        source: "#include \"common.cuh\"\n\
                 extern \"C\" __global__ void sirius_probe(float* x) {\n\
                 \x20   if (x != nullptr) { x[0] = to_f32(__float2bfloat16(1.0f)); }\n\
                 }\n",
        functions: &["sirius_probe"],
    };
    let v = version()?;
    check_headers(include_dirs)?;
    compile(&PROBE, "compute_80", include_dirs).map_err(|e| {
        let why = match e {
            Error::Cuda(msg) => msg,
            other => other.to_string(),
        };
        Error::Cuda(format!("NVRTC {}.{} cannot compile here: {why}", v.0, v.1))
    })?;
    Ok(v)
}

/// Compiles one kernel file to PTX for `arch` ("sm_80", "compute_80" or "80"), with the
/// shared header and `include_dirs` (see [`cuda_include_dirs`]). A failed compile returns
/// [`Error::Cuda`] carrying NVRTC's log.
pub fn compile(src: &KernelSource, arch: &str, include_dirs: &[PathBuf]) -> Result<Ptx> {
    let arch = virtual_arch(arch)?;
    let (program, log) = compile_program(src, &arch, include_dirs)?;
    // SAFETY: `program` is live and compiled.
    let ptx = unsafe { result::get_ptx(program.0) }
        .map_err(|e| Error::Cuda(format!("nvrtcGetPTX({}): {e:?}", src.file)))?;
    Ok(Ptx {
        file: src.file,
        arch,
        ptx: c_chars_to_string(&ptx),
        log,
    })
}

/// Compiles one kernel file to a CUBIN for the exact architecture of `arch` ("sm_80",
/// "compute_80" or "80" all give sm_80): what a driver older than NVRTC (same major) loads,
/// see [`super::compat`]. Errors as [`compile`].
pub fn compile_cubin(src: &KernelSource, arch: &str, include_dirs: &[PathBuf]) -> Result<Cubin> {
    let arch = exact_arch(arch)?;
    let (program, log) = compile_program(src, &arch, include_dirs)?;
    let cubin = program
        .cubin()
        .map_err(|e| Error::Cuda(format!("nvrtcGetCUBIN({}): {e:?}", src.file)))?;
    Ok(Cubin {
        file: src.file,
        arch,
        cubin,
        log,
    })
}

/// Compiles one kernel file to the code `kind` asks for, for a device of compute capability
/// `cc` (see [`super::compat::code_kind`]).
pub fn compile_for(
    src: &KernelSource,
    kind: CodeKind,
    cc: (u32, u32),
    include_dirs: &[PathBuf],
) -> Result<Compiled> {
    let arch = target_arch(kind, cc);
    Ok(match kind {
        CodeKind::Ptx => Compiled::Ptx(compile(src, &arch, include_dirs)?),
        CodeKind::Cubin => Compiled::Cubin(compile_cubin(src, &arch, include_dirs)?),
    })
}

/// Runs NVRTC on `src` for `arch` (as NVRTC names it: "compute_80" gives PTX, "sm_80" a
/// CUBIN too); returns the compiled program and its log.
fn compile_program(
    src: &KernelSource,
    arch: &str,
    include_dirs: &[PathBuf],
) -> Result<(Program, String)> {
    ensure_nvrtc()?;
    check_headers(include_dirs)?;
    let cstr = |what: &str, s: &str| {
        CString::new(s)
            .map_err(|_| Error::InvalidArgument(format!("{what} for NVRTC contains a NUL byte")))
    };
    let source = cstr(src.file, src.source)?;
    let name = cstr("the kernel file name", src.file)?;
    let header = cstr(COMMON_HEADER_NAME, COMMON_HEADER)?;
    let header_name = cstr("the header name", COMMON_HEADER_NAME)?;
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "-default-device".to_string(),
        "--std=c++17".to_string(),
    ];
    options.extend(
        include_dirs
            .iter()
            .map(|d| format!("--include-path={}", d.display())),
    );
    let options = options
        .iter()
        .map(|o| cstr("a compile option", o))
        .collect::<Result<Vec<_>>>()?;
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

    let headers = [header.as_ptr()];
    let header_names = [header_name.as_ptr()];
    let program = Program::create(&source, &name, &headers, &header_names)
        .map_err(|e| Error::Cuda(format!("nvrtcCreateProgram({}): {e:?}", src.file)))?;
    let n_options = c_int::try_from(option_ptrs.len())
        .map_err(|_| Error::InvalidArgument("too many NVRTC options".into()))?;
    // SAFETY: `program` is live; the option strings outlive the call.
    let status = unsafe { sys::nvrtcCompileProgram(program.0, n_options, option_ptrs.as_ptr()) };
    let log = program.log();
    if let Err(e) = status.result() {
        return Err(Error::Cuda(compile_failure(src.file, arch, e, &log)));
    }
    Ok((program, log))
}

/// The error message of a failed compile, with the fix for NVRTC's installation problems.
fn compile_failure(file: &str, arch: &str, e: result::NvrtcError, log: &str) -> String {
    let hint = if log.contains("libnvrtc-builtins") {
        "\nlibnvrtc could not load its builtins library (libnvrtc-builtins.so): put the \
         directory of libnvrtc (pip: site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH"
    } else {
        ""
    };
    format!(
        "NVRTC could not compile {file} for {arch} ({:?}):\n{}{hint}",
        e.0,
        log.trim_end()
    )
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Program {
    fn create(
        source: &CStr,
        name: &CStr,
        headers: &[*const c_char],
        header_names: &[*const c_char],
    ) -> std::result::Result<Program, result::NvrtcError> {
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        let n_headers = headers.len().min(header_names.len()) as c_int;
        // SAFETY: every pointer is a live NUL-terminated string (or array of them) for the
        // call; NVRTC copies what it keeps.
        unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                source.as_ptr(),
                name.as_ptr(),
                n_headers,
                headers.as_ptr(),
                header_names.as_ptr(),
            )
        }
        .result()?;
        Ok(Program(prog))
    }

    /// The CUBIN of a program compiled for an exact architecture (`sm_XX`).
    fn cubin(&self) -> std::result::Result<Vec<u8>, result::NvrtcError> {
        let mut size = 0usize;
        // SAFETY: the program is live; `size` is valid for a write.
        unsafe { sys::nvrtcGetCUBINSize(self.0, &mut size) }.result()?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` holds the `size` bytes NVRTC said it writes.
        unsafe { sys::nvrtcGetCUBIN(self.0, cubin.as_mut_ptr() as *mut c_char) }.result()?;
        Ok(cubin)
    }

    /// The compiler's log ("" if it cannot be read).
    fn log(&self) -> String {
        // SAFETY: the program is live.
        match unsafe { result::get_program_log(self.0) } {
            Ok(chars) => c_chars_to_string(&chars),
            Err(_) => String::new(),
        }
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here. A failure to free
        // leaks the program, nothing worse.
        let _ = unsafe { sys::nvrtcDestroyProgram(&mut self.0) };
    }
}

/// A NUL-terminated C char buffer as a String (up to the first NUL; lossy UTF-8).
fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether `dir` holds the CUDA headers the kernels need.
pub fn has_cuda_headers(dir: &Path) -> bool {
    dir.join(MARKER_HEADER).is_file()
}
