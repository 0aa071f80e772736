//! Command-line subcommands, one file each, plus the shared option and output helpers.
//! `main.rs` parses and dispatches.

pub mod bench;
pub mod calibrate;
pub mod eval;
pub mod eval_faithfulness;
pub mod eval_gsm;
pub mod fetch;
pub mod input;
pub mod output;
pub mod plan;
pub mod run;
pub mod sparsity_args;

pub use bench::BenchArgs;
pub use calibrate::CalibrateArgs;
pub use eval::EvalArgs;
pub use plan::PlanArgs;
pub use run::RunArgs;
