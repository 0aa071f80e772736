//! `/metrics`: the server's counters in Prometheus's text exposition format, for scrapers
//! and autoscalers (queue depth is the signal to add a replica).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::error::{Error, Result};

pub struct Metrics {
    registry: Registry,
    /// Requests accepted and waiting for the engine.
    pub queue_depth: IntGauge,
    /// 1 once the model is loaded.
    pub ready: IntGauge,
    /// Finished requests by endpoint and outcome (ok, cancelled, error, rejected).
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    /// Prompt tokens taken from a kept prefix instead of being prefilled.
    pub cached_prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    /// Seconds from a request's arrival (queueing included) to its first text.
    pub time_to_first_token: Histogram,
    /// Seconds between consecutive pieces of a request's text.
    pub inter_token_latency: Histogram,
    /// Tokens a Sirius verification advanced, per request.
    pub aal: Histogram,
    /// Bytes an offloaded engine streamed into its resident memory.
    pub streamed_bytes: IntCounter,
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Result<Histogram> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).map_err(metric_error)
}

fn metric_error(e: prometheus::Error) -> Error {
    Error::InvalidArgument(format!("metrics: {e}"))
}

impl Metrics {
    pub fn new() -> Result<Self> {
        let latency = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let m = Metrics {
            registry: Registry::new(),
            queue_depth: IntGauge::new("sirius_queue_depth", "Requests waiting for the engine")
                .map_err(metric_error)?,
            ready: IntGauge::new("sirius_ready", "1 once the model is loaded")
                .map_err(metric_error)?,
            requests: IntCounterVec::new(
                Opts::new("sirius_requests_total", "Requests by endpoint and outcome"),
                &["endpoint", "outcome"],
            )
            .map_err(metric_error)?,
            prompt_tokens: IntCounter::new("sirius_prompt_tokens_total", "Prompt tokens")
                .map_err(metric_error)?,
            cached_prompt_tokens: IntCounter::new(
                "sirius_cached_prompt_tokens_total",
                "Prompt tokens reused from the previous request's prompt (not prefilled)",
            )
            .map_err(metric_error)?,
            generated_tokens: IntCounter::new("sirius_generated_tokens_total", "Generated tokens")
                .map_err(metric_error)?,
            time_to_first_token: histogram(
                "sirius_time_to_first_token_seconds",
                "Seconds from a request's arrival (queueing included) to its first text",
                latency.clone(),
            )?,
            inter_token_latency: histogram(
                "sirius_inter_token_latency_seconds",
                "Seconds between consecutive pieces of streamed text",
                latency,
            )?,
            aal: histogram(
                "sirius_aal",
                "Average advance length of a Sirius request (tokens per verification)",
                vec![1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0],
            )?,
            streamed_bytes: IntCounter::new(
                "sirius_streamed_bytes_total",
                "Bytes an offloaded engine streamed into resident memory",
            )
            .map_err(metric_error)?,
        };
        m.register()?;
        Ok(m)
    }

    fn register(&self) -> Result<()> {
        let r = &self.registry;
        r.register(Box::new(self.queue_depth.clone()))
            .map_err(metric_error)?;
        r.register(Box::new(self.ready.clone()))
            .map_err(metric_error)?;
        r.register(Box::new(self.requests.clone()))
            .map_err(metric_error)?;
        r.register(Box::new(self.prompt_tokens.clone()))
            .map_err(metric_error)?;
        r.register(Box::new(self.cached_prompt_tokens.clone()))
            .map_err(metric_error)?;
        r.register(Box::new(self.generated_tokens.clone()))
            .map_err(metric_error)?;
        r.register(Box::new(self.time_to_first_token.clone()))
            .map_err(metric_error)?;
        r.register(Box::new(self.inter_token_latency.clone()))
            .map_err(metric_error)?;
        r.register(Box::new(self.aal.clone()))
            .map_err(metric_error)?;
        r.register(Box::new(self.streamed_bytes.clone()))
            .map_err(metric_error)
    }

    /// Counts one finished request.
    pub fn count(&self, endpoint: &str, outcome: &str) {
        self.requests.with_label_values(&[endpoint, outcome]).inc();
    }

    /// Everything, in the text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into memory fails only on metrics the registry itself rejected.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
