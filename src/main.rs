//! The `sirius-offload` command line.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sirius_offload::cli::{self, BenchArgs, CalibrateArgs, EvalArgs, PlanArgs, RunArgs};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "sirius-offload",
    version,
    about = "Serve big Llama-family models on one GPU or CPU: contextual sparsity, Sirius correction, offloading",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, the options of `run`.
    #[command(flatten)]
    run: Option<RunArgs>,
    /// More logging (-v info, -vv debug); SIRIUS_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout.
    Run(RunArgs),
    /// Measure prefill and decode tokens/s (llama-bench style: pp and tg tests, medians).
    Bench(BenchArgs),
    /// Calibrate per-layer CATS thresholds on sample text (for `run --cats-thresholds`).
    Calibrate(CalibrateArgs),
    /// Measure quality: perplexity of a text, GSM accuracy of full / sparse / Sirius, or how
    /// faithfully sparse and Sirius outputs follow the full model.
    #[command(after_long_help = cli::eval::EVAL_HELP)]
    Eval(EvalArgs),
    /// Plan offloading for a memory budget (no weights needed): what stays resident, what is
    /// streamed, and predicted ms/token of full decoding, the paper's offloading and ours.
    Plan(PlanArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter =
        EnvFilter::try_from_env("SIRIUS_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();

    let result: anyhow::Result<()> = match (&cli.command, &cli.run) {
        (Some(Command::Run(args)), _) | (None, Some(args)) => {
            cli::run::run(args).map_err(Into::into)
        }
        (Some(Command::Bench(args)), _) => cli::bench::bench(args).map_err(Into::into),
        (Some(Command::Calibrate(args)), _) => cli::calibrate::calibrate(args).map_err(Into::into),
        (Some(Command::Eval(args)), _) => cli::eval::eval(args).map_err(Into::into),
        (Some(Command::Plan(args)), _) => cli::plan::plan(args).map_err(Into::into),
        (None, None) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: give --model and --prompt, or a subcommand (see --help)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already name their cause; `{e}` prints it once.
            let _ = writeln!(std::io::stderr(), "error: {e}");
            ExitCode::FAILURE
        }
    }
}
