//! Command-line subcommands, one file each. `main.rs` parses and dispatches.

pub mod run;

pub use run::RunArgs;
