//! Offloading: plan what stays resident within a memory budget, and stream only the rest.
//!
//! Policy apart from mechanism: `placement` and `cost` are pure functions of shapes, formats,
//! budget and link/memory numbers (the planner: no backend, no flags); `arena`, `host_store`
//! and `runtime` execute a plan and never decide one. The runtime drives the
//! backend's copy engine (`crate::transfer`) and hands each layer's streamed weights to the
//! forward pass through `model::LayerStream`; the engine drives the runtime.

pub mod advice;
pub mod arena;
pub mod budget;
pub mod bundle_cache;
pub mod cost;
pub mod format;
pub mod host_store;
pub mod placement;
pub mod plan;
pub mod prefill;
pub mod runtime;
pub mod sizes;
