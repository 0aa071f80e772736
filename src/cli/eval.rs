//! `sirius-offload eval`: what FFN sparsity costs in quality. One task per invocation, chosen
//! by its option: `--perplexity FILE` (`cli::eval_perplexity`), `--data FILE.jsonl` (GSM
//! accuracy, `cli::eval_gsm`) or `--faithfulness FILE` (`cli::eval_faithfulness`). Every task
//! runs its modes over the same data in one process, so the rows of one table come from one
//! run.

use crate::cli::eval_args::EvalArgs;
use crate::cli::eval_faithfulness::eval_faithfulness;
use crate::cli::eval_gsm::eval_data;
use crate::cli::eval_perplexity::eval_perplexity;
use crate::error::{Error, Result};

pub fn eval(args: &EvalArgs) -> Result<()> {
    match (&args.data, &args.faithfulness, &args.perplexity) {
        (Some(path), _, _) => eval_data(args, path),
        (None, Some(path), _) => eval_faithfulness(args, path),
        (None, None, Some(path)) => eval_perplexity(args, path),
        (None, None, None) => Err(Error::InvalidArgument(
            "give a task: --perplexity FILE, --data FILE.jsonl or --faithfulness FILE".into(),
        )),
    }
}
