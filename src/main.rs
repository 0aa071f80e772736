//! The `sirius-offload` command line.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sirius_offload::cli::{self, BenchArgs, CalibrateArgs, EvalArgs, PlanArgs, RunArgs, ServeArgs};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "sirius-offload",
    version,
    about = "Serve big Llama-family models on one GPU or CPU: contextual sparsity, Sirius correction, offloading",
    after_help = "Without a subcommand, the options are those of `run`: sirius-offload --model M [--prompt P] ...",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More logging (-v info, -vv debug); SIRIUS_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout (no prompt on a terminal: a chat).
    Run(RunArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat and text completions,
    /// streamed or whole), with /health and Prometheus /metrics.
    Serve(ServeArgs),
    /// Measure prefill and decode tokens/s (llama-bench style: pp and tg tests, medians).
    Bench(BenchArgs),
    /// Calibrate per-layer CATS thresholds on sample text (for `run --cats-thresholds`).
    Calibrate(CalibrateArgs),
    /// Measure quality: perplexity of a text, GSM accuracy of full / sparse / Sirius, or how
    /// faithfully sparse and Sirius outputs follow the full model.
    #[command(after_long_help = cli::eval_args::EVAL_HELP)]
    Eval(EvalArgs),
    /// Plan offloading for a memory budget (no weights needed): what stays resident, what is
    /// streamed, and predicted ms/token of full decoding, the paper's offloading and ours.
    Plan(PlanArgs),
}

/// The command line with `run` put in front of the options when no subcommand is named:
/// `sirius-offload --model M --prompt P` is `sirius-offload run --model M --prompt P`.
fn arguments() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    // The first argument that is not the global -v flag decides: an option (`--model ...`)
    // means `run`; a word is a subcommand, and a mistyped one gets clap's suggestion.
    let first = args
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, a)| !is_verbosity(a));
    if let Some((at, arg)) = first {
        let run_option = arg.to_str().is_some_and(|a| {
            a.starts_with('-') && !matches!(a, "-h" | "--help" | "-V" | "--version")
        });
        if run_option {
            args.insert(at, OsString::from("run"));
        }
    }
    args
}

/// `-v`, `-vv`, `--verbose`.
fn is_verbosity(arg: &OsString) -> bool {
    arg.to_str().is_some_and(|a| {
        a == "--verbose" || (a.len() > 1 && a.starts_with('-') && a[1..].chars().all(|c| c == 'v'))
    })
}

/// A clap error on one line, like every other error: its message and tips joined, the usage
/// summary and the pointer to --help left out (the message names the option at fault).
fn one_line(error: &str) -> String {
    let parts: Vec<&str> = (error.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .collect();
    let mut line = String::new();
    for part in parts {
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    format!("{line} (see --help)")
}

/// clap reads `--threads -1` as an unknown option `-1`: say which option got a negative
/// number instead.
fn negative_value(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(value)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    // clap may name only the start of the argument (`-1` of `-1e-38`).
    let args: Vec<String> = std::env::args().collect();
    let at =
        (args.iter()).position(|a| a.starts_with(value.as_str()) && a.parse::<f64>().is_ok())?;
    let value = &args[at];
    let option = args
        .get(at.checked_sub(1)?)
        .filter(|o| o.starts_with("--"))?;
    Some(format!(
        "error: {option} {value}: a negative number is not a valid value here (see --help)"
    ))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(arguments()) {
        Ok(cli) => cli,
        // Help and version go to stdout as clap writes them.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            let message = negative_value(&e).unwrap_or_else(|| one_line(&e.to_string()));
            let _ = writeln!(std::io::stderr(), "{message}");
            return ExitCode::from(2);
        }
    };
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

    let result: anyhow::Result<()> = match &cli.command {
        Command::Run(args) => cli::run::run(args).map_err(Into::into),
        Command::Serve(args) => cli::serve::serve(args).map_err(Into::into),
        Command::Bench(args) => cli::bench::bench(args).map_err(Into::into),
        Command::Calibrate(args) => cli::calibrate::calibrate(args).map_err(Into::into),
        Command::Eval(args) => cli::eval::eval(args).map_err(Into::into),
        Command::Plan(args) => cli::plan::plan(args).map_err(Into::into),
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
