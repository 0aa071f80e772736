//! `sirius-offload serve`: the OpenAI-compatible server over one engine, loaded with the
//! options of `run`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use clap::Args;

use crate::backend::offload::OffloadBackend;
use crate::cli::engine_setup::{EngineSetup, OnDevice};
use crate::cli::run_args::EngineArgs;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::SamplingParams;
use crate::serve::api::RequestDefaults;
use crate::serve::{EngineSlot, ServeConfig};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on (0.0.0.0 for every interface: add --api-key then).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes (/health and /metrics stay open).
    #[arg(long, env = "SIRIUS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests that may wait while one runs; beyond them a request gets 429 at once.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_queue: usize,
    /// The model name clients send and /v1/models lists [default: --model as given].
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Don't keep each request's prompt KV cache for the next request (by default a request
    /// that continues the previous one's prompt, a conversation's next turn, prefills only
    /// its new tokens; on quantized weights those few tokens take the 8-bit activations of
    /// short batches, so a near-tie can pick another token than the request alone would).
    #[arg(long)]
    pub no_prompt_cache: bool,
    /// max_tokens of requests that give none.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// temperature of requests that give none [default: 0.7; 0 with Sirius or offloading,
    /// which decode greedily and refuse other temperatures].
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Sampling keeps the K most likely tokens (0 = off), for every request.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// top_p of requests that give none (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    let setup = EngineSetup::new(&args.engine, args.temperature)?;
    // Before the address is bound and announced.
    args.engine.model.check_threads()?;
    if args.engine.offload.trace.is_some() {
        return Err(Error::InvalidArgument(
            "--trace records one run: use it with `run`, not `serve`".into(),
        ));
    }
    if !(0.0..=2.0).contains(&setup.temperature) {
        return Err(Error::InvalidArgument(format!(
            "--temperature must be between 0 and 2 (the API's range), got {}",
            crate::units::format_number(setup.temperature)
        )));
    }
    if args.api_key.as_deref() == Some("") {
        tracing::warn!("--api-key is empty: requests are not checked for a key");
    }
    SamplingParams {
        temperature: setup.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: 0,
    }
    .validate()?;
    if !(1..=crate::serve::MAX_QUEUE).contains(&args.max_queue) {
        return Err(Error::InvalidArgument(format!(
            "--max-queue must be between 1 and {}",
            crate::serve::MAX_QUEUE
        )));
    }
    if args.max_tokens == 0 {
        return Err(Error::InvalidArgument(
            "--max-tokens must be at least 1".into(),
        ));
    }
    let addr = listen_address(&args.host, args.port)?;
    // Fetching a preset (minutes) happens before the server listens; the load after.
    let dir = setup.model_dir()?;
    let config = ServeConfig {
        addr,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_queue: args.max_queue,
        model_id: (args.served_model_name.clone())
            .unwrap_or_else(|| args.engine.model.model.clone()),
        defaults: RequestDefaults {
            max_tokens: args.max_tokens,
            temperature: setup.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            greedy_only: setup.greedy_only(),
        },
        decoding: setup.decoding,
        context: args.engine.ctx_size,
        prefill_chunk: args.engine.prefill_chunk,
        keep_prompts: !args.no_prompt_cache,
    };
    if config.api_key.is_none() && !addr.ip().is_loopback() {
        tracing::warn!("listening on {addr} without --api-key: anyone who reaches it can use it");
    }
    // The engine thread resolves its own copy of the options (they borrow the arguments).
    let (engine_args, temperature) = (args.engine.clone(), args.temperature);
    crate::serve::serve(config, move |slot| {
        let setup = EngineSetup::new(&engine_args, temperature)?;
        setup.on_device(LoadAndServe {
            setup: &setup,
            dir,
            slot,
        })
    })
}

/// The engine thread's work: load on the device's backend, then serve the queue.
struct LoadAndServe<'a> {
    setup: &'a EngineSetup<'a>,
    dir: PathBuf,
    slot: EngineSlot,
}

impl OnDevice for LoadAndServe<'_> {
    type Output = ();
    fn run<B: OffloadBackend>(self, backend: B, _threads: usize) -> Result<()> {
        let engine = Engine::load(&self.dir, backend, &self.setup.engine_config())?;
        self.slot.work(engine)
    }
}

fn listen_address(host: &str, port: u16) -> Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::InvalidArgument(format!("--host {host}: {e}")))?
        .next()
        .ok_or_else(|| Error::InvalidArgument(format!("--host {host}: no address found")))
}
