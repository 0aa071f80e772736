//! Command-line subcommands, one file each. `main.rs` parses and dispatches.

pub mod bench;
pub mod fetch;
pub mod output;
pub mod run;
pub mod sparsity_args;

pub use bench::BenchArgs;
pub use run::RunArgs;
