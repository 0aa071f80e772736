//! The engine's side of the server: one thread owns the engine and takes jobs from a bounded
//! queue, first come first served. Each job carries the channel its events go back on; a
//! closed channel (the client went away) cancels the job before it starts, or within the
//! step that notices it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::mpsc::UnboundedSender;

use crate::backend::offload::OffloadBackend;
use crate::engine::{Decoding, Engine, GenerationOutput, PrefillChunk, RequestOptions, StopReason};
use crate::error::{Error, Result};
use crate::serve::api::{Endpoint, Input, JobSpec};
use crate::serve::error::ApiError;
use crate::serve::metrics::Metrics;

/// What the engine sends back for one job: `Started`, then `Text` pieces, then `Done`; or
/// `Failed` at any point.
#[derive(Debug)]
pub enum Event {
    Started { prompt_tokens: usize },
    Text(String),
    Done(Finish),
    Failed(ApiError),
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Finish {
    pub reason: StopReason,
    pub prompt_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub completion_tokens: usize,
}

pub struct Job {
    pub spec: JobSpec,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
}

/// The server's handle on the queue.
#[derive(Clone)]
pub struct Queue {
    sender: Sender<Job>,
    metrics: Arc<Metrics>,
}

impl Queue {
    /// Queues `job`, or says at once why not: 429 when `max_queue` jobs already wait, 503
    /// when the engine is gone.
    pub fn submit(&self, job: Job) -> std::result::Result<(), ApiError> {
        use axum::http::StatusCode;
        // Counted before the send: the engine may take the job (and count it out) at once.
        self.metrics.queue_depth.inc();
        match self.sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.dec();
                Err(match e {
                    TrySendError::Full(_) => ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        format!(
                            "the server is busy: its queue of {} waiting request(s) is full; \
                             retry later",
                            self.sender.capacity().unwrap_or(0)
                        ),
                    )
                    .with_code("queue_full"),
                    TrySendError::Disconnected(_) => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the engine has stopped; the server is shutting down",
                    ),
                })
            }
        }
    }
}

/// A queue of `max_queue` waiting jobs and the receiving end the engine thread works from.
pub fn queue(max_queue: usize, metrics: Arc<Metrics>) -> (Queue, Receiver<Job>) {
    let (sender, receiver) = crossbeam_channel::bounded(max_queue);
    (Queue { sender, metrics }, receiver)
}

/// Where the engine thread works: the queue's receiving end and the server's metrics.
pub struct EngineSlot {
    pub(crate) jobs: Receiver<Job>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) decoding: Decoding,
    /// Context cap in tokens (`None`: the model's own).
    pub(crate) context: Option<usize>,
    pub(crate) prefill_chunk: PrefillChunk,
    pub(crate) keep_prompts: bool,
}

impl EngineSlot {
    /// Serves jobs with `engine` until the server drops the queue (shutdown). A panic inside
    /// a job fails that job and stops the engine (its state is no longer trusted): the error
    /// ends the server.
    pub fn work<B: OffloadBackend>(self, mut engine: Engine<B>) -> Result<()> {
        engine.remember_prompts(self.keep_prompts);
        self.check_budget(&engine)?;
        self.metrics.ready.set(1);
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("ready: {}\n", engine.model.backend_description()).as_bytes(),
        );
        while let Ok(job) = self.jobs.recv() {
            self.metrics.queue_depth.dec();
            let endpoint = endpoint_label(job.spec.endpoint);
            if job.events.is_closed() {
                // Its client left while it waited.
                self.metrics.count(endpoint, "cancelled");
                continue;
            }
            let ran = catch_unwind(AssertUnwindSafe(|| self.run(&mut engine, &job)));
            let outcome = match ran {
                Ok(Ok(StopReason::Cancelled)) => "cancelled",
                Ok(Ok(_)) => "ok",
                Ok(Err(e)) => {
                    let _ = job.events.send(Event::Failed(e));
                    "error"
                }
                Err(_) => {
                    let e = "the engine failed on this request and stopped";
                    let _ = job.events.send(Event::Failed(ApiError::new(
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        e,
                    )));
                    self.metrics.count(endpoint, "error");
                    self.metrics.ready.set(0);
                    return Err(Error::InvalidArgument(e.into()));
                }
            };
            self.metrics.count(endpoint, outcome);
        }
        Ok(())
    }

    /// An offloaded engine's budget must hold the smallest request (one prompt token, one
    /// generated), or every request would fail: refused before the server says it is ready.
    /// With `--prefill-chunk N` a prompt of N tokens too, so that a chunk the budget cannot
    /// hold is the server's error at start, not every long request's.
    fn check_budget<B: OffloadBackend>(&self, engine: &Engine<B>) -> Result<()> {
        if !engine.is_offloaded() {
            return Ok(());
        }
        let sirius = match self.decoding {
            Decoding::Sirius(config) => config,
            _ => crate::sirius::SiriusConfig::default(),
        };
        let opts = RequestOptions {
            context: self.context,
            prefill_chunk: self.prefill_chunk,
            ..RequestOptions::greedy(1)
        };
        engine.offload_plan(&[0], &opts, &sirius)?;
        if let PrefillChunk::Fixed(n) = self.prefill_chunk {
            let context = (self.context).map_or(engine.context(), |c| c.min(engine.context()));
            let longest = n.min(context.saturating_sub(1)).max(1);
            engine.offload_plan(&vec![0; longest], &opts, &sirius)?;
        }
        Ok(())
    }

    /// Runs one job, streaming its events.
    fn run<B: OffloadBackend>(
        &self,
        engine: &mut Engine<B>,
        job: &Job,
    ) -> std::result::Result<StopReason, ApiError> {
        let spec = &job.spec;
        let prompt = match &spec.input {
            Input::Chat(messages) => engine.encode_chat(messages)?,
            Input::Text(text) => engine.encode(text, None)?,
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty"));
        }
        let context = self
            .context
            .map_or(engine.context(), |c| c.min(engine.context()));
        if prompt.len() >= context {
            return Err(Error::PromptTooLong {
                prompt_tokens: prompt.len(),
                context,
            }
            .into());
        }
        let _ = job.events.send(Event::Started {
            prompt_tokens: prompt.len(),
        });
        let opts = RequestOptions {
            max_tokens: spec.max_tokens,
            sampling: spec.sampling,
            stop_strings: spec.stop.clone(),
            context: self.context,
            prefill_chunk: self.prefill_chunk,
            ..RequestOptions::greedy(spec.max_tokens)
        };
        let mut last_piece: Option<Instant> = None;
        let mut on_text = |piece: &str| {
            let now = Instant::now();
            match last_piece {
                None => self
                    .metrics
                    .time_to_first_token
                    .observe((now - job.arrived).as_secs_f64()),
                Some(t) => self
                    .metrics
                    .inter_token_latency
                    .observe((now - t).as_secs_f64()),
            }
            last_piece = Some(now);
            // A send fails once the client is gone: stop generating for nobody.
            job.events.send(Event::Text(piece.to_string())).is_ok()
        };
        let out = engine.generate(&prompt, &opts, self.decoding, &mut on_text)?;
        self.record(&out);
        let reason = out.stop_reason;
        let _ = job.events.send(Event::Done(Finish {
            reason,
            prompt_tokens: out.prompt_tokens,
            cached_prompt_tokens: out.cached_prompt_tokens,
            completion_tokens: out.generated_tokens,
        }));
        Ok(reason)
    }

    fn record(&self, out: &GenerationOutput) {
        let m = &self.metrics;
        m.prompt_tokens.inc_by(out.prompt_tokens as u64);
        m.cached_prompt_tokens
            .inc_by(out.cached_prompt_tokens as u64);
        m.generated_tokens.inc_by(out.generated_tokens as u64);
        if let Some(s) = out.sirius.as_ref().filter(|s| s.verifications > 0) {
            m.aal.observe(s.aal);
        }
        if let Some(o) = &out.offload {
            m.streamed_bytes.inc_by(o.streamed_bytes);
        }
    }
}

pub fn endpoint_label(e: Endpoint) -> &'static str {
    match e {
        Endpoint::Chat => "chat",
        Endpoint::Completion => "completions",
    }
}
