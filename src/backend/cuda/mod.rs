//! CUDA backend (feature `cuda`). So far: the kernels ([`kernels`], sources in `kernels/*.cu`)
//! and their run-time compilation with NVRTC ([`nvrtc`]); the device context, memory,
//! streams and launches come next (issue 6).

pub mod device;
pub mod kernels;
pub mod memory;
pub mod nvrtc;
