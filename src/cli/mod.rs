//! The command line: one file per subcommand, which parses its options once into the
//! library's typed configurations and calls the engine; the option groups several of them
//! share (`args`), and the input, output and error wording helpers. `main.rs` dispatches.

pub mod args;
pub mod bench;
pub mod bench_plot;
pub mod bench_plot_axis;
pub mod bench_report;
pub mod bench_sirius;
pub mod calibrate;
pub mod chat;
pub mod engine_setup;
pub mod eval;
pub mod eval_args;
pub mod eval_common;
pub mod eval_faithfulness;
pub mod eval_gsm;
pub mod eval_perplexity;
pub mod fetch;
pub mod input;
pub mod output;
pub mod plan;
pub mod run;
pub mod run_args;
pub mod serve;
pub mod wording;

pub use bench::BenchArgs;
pub use calibrate::CalibrateArgs;
pub use eval_args::EvalArgs;
pub use plan::PlanArgs;
pub use run_args::RunArgs;
pub use serve::ServeArgs;
