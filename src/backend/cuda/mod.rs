//! CUDA backend (feature `cuda`): the kernels ([`kernels`], sources in `kernels/*.cu`), their
//! run-time compilation with NVRTC ([`nvrtc`]), the device probe ([`device`]), pinned memory,
//! streams and events ([`memory`]) and the copy engine built on them ([`copy_engine`];
//! `offload` plugs both into the offloading runtime), and [`CudaBackend`], the `Backend` and
//! `SparseOps` ops on a GPU (`ops_*`).

mod assemble;
mod backend;
mod buffers;
pub mod compat;
mod context;
pub mod copy_engine;
pub mod device;
pub mod kernels;
pub mod memory;
pub mod nvrtc;
mod offload;
mod ops_attention;
mod ops_basic;
mod ops_ffn;
mod ops_kv;
mod ops_matmul;
mod ops_sampling;
mod temps;
mod windows;

pub use backend::CudaBackend;
pub use buffers::{CudaBuf, CudaMatrix};
pub use ops_kv::CudaKv;
pub use ops_matmul::{GemmPrecision, GEMM_ENV};
