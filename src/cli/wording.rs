//! The library's typed errors in the words of the command line: the offloading planner
//! knows budgets and plan fields, not the options that set them.

use crate::error::Error;
use crate::units::format_bytes;

/// `e` with the options of an offloaded `run` named (`budget_option`: the option that set
/// the budget, if any); other errors pass through.
pub fn word_offload_error(e: Error, budget_option: Option<&str>) -> Error {
    let fields: &[(&str, &str)] = &[
        ("keep", "--keep"),
        ("link_gbps", "--link-gbps"),
        ("mem_gbps", "--mem-gbps"),
        ("period", "--period"),
        ("context", "the context (--ctx-size, --max-tokens)"),
        ("prompt_tokens", "the prompt's length"),
        ("kv_bytes", "the KV cache's element size"),
    ];
    word_plan_error(e, budget_option.unwrap_or("the memory budget"), fields)
}

/// `e` with the planner's fields named by `fields` (field, option) and the budget by
/// `budget_option`; other errors pass through.
pub fn word_plan_error(e: Error, budget_option: &str, fields: &[(&str, &str)]) -> Error {
    match e {
        Error::BudgetBelowMinimum {
            budget,
            minimum,
            needs,
        } => Error::InvalidArgument(format!(
            "{budget_option} {} is below the minimum of {} this model needs resident ({needs}); \
             give at least {minimum} bytes, or shorten the context (--context, or --max-tokens / \
             --ctx-size for run: the KV cache grows with it)",
            format_bytes(budget),
            format_bytes(minimum)
        )),
        Error::PlanInput { field, problem } => {
            let name = match field {
                "budget" => budget_option,
                other => (fields.iter())
                    .find(|(f, _)| *f == other)
                    .map_or(other, |(_, option)| option),
            };
            Error::InvalidArgument(format!("{name} {problem}"))
        }
        other => other,
    }
}
