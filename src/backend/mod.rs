//! Compute backends. `cpu` is the reference backend.

pub mod cpu;
