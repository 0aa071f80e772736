//! The HTTP side: routes, the API-key check, and each generation request's way through the
//! queue to a whole response or a stream of server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::serve::api::{parse_chat, parse_completion, Endpoint, RequestDefaults};
use crate::serve::error::ApiError;
use crate::serve::metrics::Metrics;
use crate::serve::openai::{Piece, ResponseIds};
use crate::serve::worker::{endpoint_label, Event, Finish, Job, Queue};

/// What every handler shares.
pub struct Shared {
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
    pub model_id: String,
    pub api_key: Option<String>,
    pub defaults: RequestDefaults,
}

type AppState = Arc<Shared>;

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route_layer(middleware::from_fn_with_state(state.clone(), check_key));
    // Also for the open routes below: a wrong method gets an error object, not an empty 405.
    // Health and metrics stay open: load balancers and scrapers carry no API key.
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

async fn check_key(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let Some(key) = &s.api_key else {
        return next.run(request).await;
    };
    let given = (request.headers().get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    match given {
        Some(g) if same_secret(g.as_bytes(), key.as_bytes()) => next.run(request).await,
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key: send the server's --api-key as `Authorization: Bearer KEY`",
        )
        .with_code("invalid_api_key")
        .into_response(),
    }
}

/// Compares without stopping at the first differing byte (no timing hint of the key).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn chat(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(s, Endpoint::Chat, body).await
}

async fn completions(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(s, Endpoint::Completion, body).await
}

/// One generation request: checked, queued (or refused at once), then answered whole or
/// streamed. Dropping the response (the client went away) drops the event receiver, which
/// the engine sees as a cancellation.
async fn generate(
    s: AppState,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let label = endpoint_label(endpoint);
    let spec = body
        .map_err(|e| ApiError::new(e.status(), e.body_text()))
        .and_then(|b| match endpoint {
            Endpoint::Chat => parse_chat(&b, &s.defaults, &s.model_id),
            Endpoint::Completion => parse_completion(&b, &s.defaults, &s.model_id),
        });
    let spec = match spec {
        Ok(spec) => spec,
        Err(e) => return refuse(&s, label, e),
    };
    let (stream, include_usage) = (spec.stream, spec.include_usage);
    let (tx, mut rx) = unbounded_channel();
    let job = Job {
        spec,
        events: tx,
        arrived: Instant::now(),
    };
    if let Err(e) = s.queue.submit(job) {
        return refuse(&s, label, e);
    }
    // The first event says whether the engine took the prompt (errors keep their status).
    match rx.recv().await {
        Some(Event::Started { .. }) => {}
        Some(Event::Failed(e)) => return e.into_response(),
        _ => return engine_gone().into_response(),
    }
    let ids = ResponseIds::new(endpoint, &s.model_id);
    if stream {
        // Comments every 15 s keep proxies from closing a stream whose prompt takes long.
        Sse::new(event_stream(ids, rx, include_usage))
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        whole(ids, rx).await
    }
}

fn refuse(s: &Shared, label: &str, e: ApiError) -> Response {
    s.metrics.count(label, "rejected");
    e.into_response()
}

fn engine_gone() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine stopped during this request",
    )
}

async fn whole(ids: ResponseIds, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(piece)) => text.push_str(&piece),
            Some(Event::Done(finish)) => {
                return Json(ids.completion(&text, &finish)).into_response()
            }
            Some(Event::Failed(e)) => return e.into_response(),
            Some(Event::Started { .. }) => {}
            None => return engine_gone().into_response(),
        }
    }
}

/// Where a stream is.
enum Phase {
    /// Chat streams open with the assistant's role.
    Role,
    Text,
    Usage(Finish),
    DoneMarker,
    End,
}

type StreamState = (UnboundedReceiver<Event>, ResponseIds, Phase, bool);

/// The chunks of a streamed answer, `[DONE]` last; an error part-way is sent as OpenAI's
/// error object and ends the stream.
fn event_stream(
    ids: ResponseIds,
    rx: UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let first = match ids.endpoint {
        Endpoint::Chat => Phase::Role,
        Endpoint::Completion => Phase::Text,
    };
    let state: StreamState = (rx, ids, first, include_usage);
    stream::unfold(state, |(mut rx, ids, phase, usage)| async move {
        let data = |v: serde_json::Value| SseEvent::default().data(v.to_string());
        let (event, next) = match phase {
            Phase::Role => (data(ids.chunk(Piece::Role)), Phase::Text),
            Phase::Text => match next_event(&mut rx).await {
                Some(Event::Text(t)) => (data(ids.chunk(Piece::Text(&t))), Phase::Text),
                Some(Event::Done(f)) => {
                    // Usage once: here, or in the usage-only chunk that follows.
                    let event = data(ids.chunk(Piece::Finish(&f, !usage)));
                    (
                        event,
                        if usage {
                            Phase::Usage(f)
                        } else {
                            Phase::DoneMarker
                        },
                    )
                }
                Some(Event::Failed(e)) => (data(e.body()), Phase::End),
                Some(Event::Started { .. }) | None => (data(engine_gone().body()), Phase::End),
            },
            Phase::Usage(f) => (data(ids.usage_chunk(&f)), Phase::DoneMarker),
            Phase::DoneMarker => (SseEvent::default().data("[DONE]"), Phase::End),
            Phase::End => return None,
        };
        Some((Ok(event), (rx, ids, next, usage)))
    })
    .boxed()
}

async fn next_event(rx: &mut UnboundedReceiver<Event>) -> Option<Event> {
    loop {
        match rx.recv().await {
            Some(Event::Started { .. }) => continue,
            other => return other,
        }
    }
}

fn model_object(id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "sirius-offload"})
}

async fn models(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [model_object(&s.model_id)]}))
}

async fn model(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    if id == s.model_id {
        return Json(model_object(&id)).into_response();
    }
    let message = format!(
        "the model {id:?} does not exist on this server: it serves {:?}",
        s.model_id
    );
    ApiError::new(StatusCode::NOT_FOUND, message)
        .with_code("model_not_found")
        .into_response()
}

/// 200 once the model is loaded, 503 before (a load balancer's readiness probe).
async fn health(State(s): State<AppState>) -> Response {
    match s.metrics.ready.get() {
        1 => Json(json!({"status": "ok", "model": s.model_id})).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (content_type, s.metrics.render()).into_response()
}

async fn wrong_method(request: Request) -> Response {
    let message = format!(
        "{} is not allowed on {}",
        request.method(),
        request.uri().path()
    );
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, message).into_response()
}

async fn not_found(request: Request) -> Response {
    let message = format!(
        "no route {} {}: this server answers POST /v1/chat/completions, POST /v1/completions, \
         GET /v1/models, GET /health, GET /metrics",
        request.method(),
        request.uri().path()
    );
    ApiError::new(StatusCode::NOT_FOUND, message).into_response()
}
