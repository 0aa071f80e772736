//! The interactive chat: `sirius-offload --model M` on a terminal without a prompt. Each turn
//! renders the whole conversation with the model's chat template; the engine keeps the last
//! prompt's KV cache, so a turn prefills only what was said since. Ctrl-C stops the answer
//! being written (at the input line it quits), `/reset` starts over, `/exit` or Ctrl-D ends.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend::offload::OffloadBackend;
use crate::cli::run::RunJob;
use crate::cli::wording::word_offload_error;
use crate::engine::{Engine, GenerationOutput, StopReason};
use crate::error::{Error, Result};
use crate::model::chat::ChatMessage;

/// The commands, as `/help` (or any unknown `/word`) lists them.
const HELP: &str = "commands: /reset starts over, /exit (or Ctrl-D) quits; Ctrl-C stops an answer";

/// Ctrl-C's two meanings: stop the answer while one is written, else quit.
#[derive(Default)]
struct Interrupt {
    answering: AtomicBool,
    stop: AtomicBool,
}

pub(crate) fn chat<B: OffloadBackend>(mut engine: Engine<B>, job: &RunJob<'_>) -> Result<()> {
    if !engine.has_chat_template() {
        return Err(Error::InvalidArgument(format!(
            "{} has no chat template, so it cannot chat: give the text to continue with --prompt",
            engine.path.display()
        )));
    }
    engine.remember_prompts(true);
    let interrupt = Arc::new(Interrupt::default());
    let handler = interrupt.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        if handler.answering.load(Ordering::SeqCst) {
            handler.stop.store(true, Ordering::SeqCst);
        } else {
            let _ = writeln!(std::io::stderr());
            std::process::exit(130);
        }
    }) {
        tracing::warn!("Ctrl-C will end the program, not only the answer: {e}");
    }
    let mut history: Vec<ChatMessage> = (job.args.prompt.system.iter())
        .map(|s| ChatMessage {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    let kept = history.len();
    let _ = writeln!(
        std::io::stderr(),
        "chatting with {} [{}]; {HELP}",
        engine.path.display(),
        engine.model.backend_description()
    );
    let stdin = std::io::stdin();
    loop {
        let _ = write!(std::io::stdout(), "\n> ");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        if stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| Error::io("standard input", e))?
            == 0
        {
            break;
        }
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(kept);
                let _ = writeln!(std::io::stderr(), "(the conversation is forgotten)");
                continue;
            }
            // A single word after a slash is a command; anything longer is a message.
            command if command.starts_with('/') && !command.contains(char::is_whitespace) => {
                let _ = writeln!(std::io::stderr(), "{HELP}");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: line.trim_end_matches(['\r', '\n']).to_string(),
        });
        match answer(&mut engine, job, &history, &interrupt) {
            Ok(out) => history.push(ChatMessage {
                role: "assistant".into(),
                content: out.text,
            }),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "error: {e}");
                history.pop();
            }
        }
    }
    Ok(())
}

/// One answer to the conversation so far, streamed to stdout.
fn answer<B: OffloadBackend>(
    engine: &mut Engine<B>,
    job: &RunJob<'_>,
    history: &[ChatMessage],
    interrupt: &Interrupt,
) -> Result<GenerationOutput> {
    let ids = engine.encode_chat(history)?;
    let opts = job.request_options();
    interrupt.stop.store(false, Ordering::SeqCst);
    interrupt.answering.store(true, Ordering::SeqCst);
    let mut stdout = std::io::stdout();
    let mut on_text = |piece: &str| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
        !interrupt.stop.load(Ordering::SeqCst)
    };
    let budget_option = job.setup.offload.as_ref().map(|(_, option)| *option);
    let out = engine.generate(&ids, &opts, job.setup.decoding, &mut on_text);
    interrupt.answering.store(false, Ordering::SeqCst);
    let out = out.map_err(|e| word_offload_error(e, budget_option))?;
    let _ = writeln!(std::io::stdout());
    let mut err = std::io::stderr();
    if out.stop_reason == StopReason::Cancelled {
        let _ = writeln!(err, "[stopped]");
    }
    if !job.args.quiet {
        let _ = writeln!(
            err,
            "[{} prompt tokens ({} reused), {} generated, {:.1} tok/s, stop: {}]",
            out.prompt_tokens,
            out.cached_prompt_tokens,
            out.generated_tokens,
            out.decode_tokens_per_s,
            out.stop_reason
        );
    }
    Ok(out)
}
