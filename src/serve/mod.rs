//! `serve`: an OpenAI-compatible HTTP server over one [`Engine`](crate::engine::Engine).
//!
//! The HTTP side runs on tokio with axum (`routes`); requests are parsed and checked there
//! (`api`) and queued (`worker::Queue`, bounded: a full queue is a 429 at once). One thread
//! owns the engine and runs the queue first come first served (`worker::EngineSlot`),
//! sending each request's text back on its own channel as it is generated; a closed channel
//! is a client that left, and cancels its generation. Responses and stream chunks take
//! OpenAI's shapes (`openai`), errors its error object (`error`), `/metrics` Prometheus's
//! text format (`metrics`).
//!
//! Requests run one at a time: the engine's forward pass takes one sequence, and an
//! offloaded engine's runtime is planned for one request's shape. The engine keeps the last
//! request's prompt, so a conversation's next turn prefills only its new tokens.

pub mod api;
mod body;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod worker;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::engine::{Decoding, PrefillChunk};
use crate::error::{Error, Result};
use api::RequestDefaults;
use metrics::Metrics;
pub use worker::EngineSlot;

/// How a server is set up.
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// Requests must send `Authorization: Bearer KEY` (not /health, /metrics).
    pub api_key: Option<String>,
    /// Requests that may wait for the engine beside the one it runs.
    pub max_queue: usize,
    /// The model name clients give (`GET /v1/models`).
    pub model_id: String,
    pub defaults: RequestDefaults,
    /// How every request decodes (the engine's sparsity and Sirius are set at load).
    pub decoding: Decoding,
    /// Context cap in tokens (`None`: the model's own).
    pub context: Option<usize>,
    /// Prompt tokens per prefill pass (`--prefill-chunk`).
    pub prefill_chunk: PrefillChunk,
    /// Keep each request's prompt for a next one that continues it (a conversation's turns).
    pub keep_prompts: bool,
}

/// The longest queue `--max-queue` may ask for (its slots are allocated up front).
pub const MAX_QUEUE: usize = 100_000;

/// Serves until SIGINT or SIGTERM (in-flight requests finish; a second signal exits at
/// once) or until the engine fails. `engine` runs on its own thread: it loads the engine and
/// hands it to [`EngineSlot::work`]; the server listens meanwhile (`/health` answers 503
/// until the model is loaded, and requests queue).
pub fn serve<F>(config: ServeConfig, engine: F) -> Result<()>
where
    F: FnOnce(EngineSlot) -> Result<()> + Send + 'static,
{
    if !(1..=MAX_QUEUE).contains(&config.max_queue) {
        return Err(Error::InvalidArgument(format!(
            "--max-queue must be between 1 and {MAX_QUEUE}"
        )));
    }
    let metrics = Arc::new(Metrics::new()?);
    let (queue, jobs) = worker::queue(config.max_queue, metrics.clone());
    let slot = EngineSlot {
        jobs,
        metrics: metrics.clone(),
        decoding: config.decoding,
        context: config.context,
        prefill_chunk: config.prefill_chunk,
        keep_prompts: config.keep_prompts,
    };
    let state = Arc::new(routes::Shared {
        queue,
        metrics: metrics.clone(),
        model_id: config.model_id.clone(),
        api_key: config.api_key.clone(),
        defaults: config.defaults.clone(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Serve(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(run(config, state, slot, engine))
}

async fn run<F>(
    config: ServeConfig,
    state: Arc<routes::Shared>,
    slot: EngineSlot,
    engine: F,
) -> Result<()>
where
    F: FnOnce(EngineSlot) -> Result<()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| Error::Serve(format!("cannot listen on {}: {e}", config.addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Serve(format!("cannot read the listening address: {e}")))?;
    let _ = writeln!(
        std::io::stderr(),
        "listening on http://{local} for {:?} (OpenAI API under /v1); loading the model: GET /health answers 200 once it is ready",
        config.model_id
    );
    // The engine's failure (a load error, a panic) ends the server with that error.
    let failure: Arc<Mutex<Option<Error>>> = Arc::default();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let failed = failure.clone();
    let metrics = state.metrics.clone();
    let leftovers = slot.jobs.clone();
    let depth = metrics.queue_depth.clone();
    let worker = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine(slot)))
                .unwrap_or_else(|_| Err(Error::Serve("the engine thread panicked".into())));
            let reason = match result {
                Ok(()) => "the server is shutting down".to_string(),
                Err(e) => {
                    let reason = format!("the engine stopped: {e}");
                    if let Ok(mut f) = failed.lock() {
                        *f = Some(e);
                    }
                    reason
                }
            };
            let _ = stopped_tx.send(());
            // Requests still queued get an answer (the queue ends when the router is gone).
            while let Ok(job) = leftovers.recv() {
                depth.dec();
                let status = axum::http::StatusCode::SERVICE_UNAVAILABLE;
                let _ = job.events.send(worker::Event::Failed(error::ApiError::new(
                    status,
                    reason.clone(),
                )));
            }
        })
        .map_err(|e| Error::Serve(format!("cannot start the engine thread: {e}")))?;
    let shutdown = async move {
        tokio::select! {
            () = signal() => {
                let _ = writeln!(std::io::stderr(), "shutting down: finishing the requests in flight (a second Ctrl-C exits now)");
                tokio::spawn(async { signal().await; std::process::exit(130) });
            }
            _ = stopped_rx => {}
        }
    };
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Serve(format!("the server failed: {e}")))?;
    // The router (and with it the queue's sender) is gone: the engine thread's loop ends.
    // A model still loading is not waited for.
    if metrics.ready.get() == 1 {
        let _ = worker.join();
    }
    match failure.lock().ok().and_then(|mut f| f.take()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// SIGINT or (on Unix) SIGTERM.
async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
