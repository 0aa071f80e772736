//! Offloading: plan what stays resident within a memory budget, and stream only the rest.
//!
//! Policy apart from mechanism (DESIGN.md): `placement` and `cost` are pure functions of shapes,
//! formats, budget and link/memory numbers; `arena`, `stream` and `runtime` execute a plan and
//! never decide one.

pub mod arena;
pub mod cost;
pub mod format;
pub mod host_store;
pub mod offload_backend;
pub mod placement;
pub mod resident_set;
pub mod runtime;
pub mod sirius_model;
pub mod size;
pub mod stream;
pub mod trace;

pub use size::{format_bytes, parse_size};
