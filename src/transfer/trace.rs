//! A cheap, thread-safe recorder of spans, written as Chrome trace-event JSON (opens in
//! Perfetto or chrome://tracing) so a correction window's copies and compute can be seen side
//! by side.
//!
//! Callers hold an `Option<Trace>`: `None` is tracing off and costs nothing but the branch.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One row ("thread") in the trace viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Track {
    /// The thread that runs the model (layers, ops, stalls waiting for copies).
    Compute,
    /// The copy engine (host -> fast memory transfers).
    Copy,
    /// Host-side work outside the copy engine (gathering neuron bundles, sampling, ...).
    Host,
}

impl Track {
    /// The name shown on the track's row.
    pub fn name(self) -> &'static str {
        match self {
            Track::Compute => "compute",
            Track::Copy => "copy engine",
            Track::Host => "host",
        }
    }

    /// Chrome's thread id for the track (also its sort order).
    fn tid(self) -> u32 {
        match self {
            Track::Compute => 1,
            Track::Copy => 2,
            Track::Host => 3,
        }
    }

    const ALL: [Track; 3] = [Track::Compute, Track::Copy, Track::Host];
}

#[derive(Debug)]
struct Span {
    track: Track,
    name: String,
    /// Microseconds since the trace's epoch.
    start_us: f64,
    dur_us: f64,
    args: Value,
}

#[derive(Debug)]
struct Inner {
    epoch: Instant,
    spans: Mutex<Vec<Span>>,
}

/// A span recorder; clones share one record (hand a clone to another thread).
#[derive(Debug, Clone)]
pub struct Trace {
    inner: Arc<Inner>,
}

/// Per-track totals of a trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackSummary {
    /// The track's name ("compute", "copy engine", "host").
    pub track: String,
    /// Spans recorded on the track.
    pub spans: usize,
    /// Seconds covered by at least one span of the track (overlapping spans count once).
    pub busy_s: f64,
}

/// Totals of a trace, for stats JSON and reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    /// Seconds from the earliest span start to the latest span end (0 with no spans).
    pub wall_s: f64,
    /// Tracks with at least one span, in track order.
    pub tracks: Vec<TrackSummary>,
}

impl Default for Trace {
    fn default() -> Self {
        Trace::new()
    }
}

impl Trace {
    /// An empty trace whose time zero is now.
    pub fn new() -> Self {
        Trace {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                spans: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Records a span from `start` to `end` on `track`; `args` shows in the viewer's details
    /// (use `Value::Null` for none). Times before the epoch are clamped to it.
    pub fn span(
        &self,
        track: Track,
        name: impl Into<String>,
        start: Instant,
        end: Instant,
        args: Value,
    ) {
        let epoch = self.inner.epoch;
        let start_us = start.saturating_duration_since(epoch).as_secs_f64() * 1e6;
        let dur_us = end.saturating_duration_since(start).as_secs_f64() * 1e6;
        let span = Span {
            track,
            name: name.into(),
            start_us,
            dur_us,
            args,
        };
        self.spans().push(span);
    }

    /// Number of spans recorded so far.
    pub fn len(&self) -> usize {
        self.spans().len()
    }

    /// Whether no span has been recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes `{"traceEvents":[...],"displayTimeUnit":"ms"}`: one "X" event per span (ts and
    /// dur in microseconds, pid 1, one tid per track) and "M" events naming the process and
    /// the tracks.
    pub fn write_chrome_json(&self, path: &Path) -> Result<()> {
        let doc = self.chrome_json();
        let write_err = |source| Error::Write {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(write_err)?;
        let mut out = BufWriter::new(file);
        serde_json::to_writer(&mut out, &doc).map_err(|e| write_err(e.into()))?;
        out.flush().map_err(write_err)
    }

    /// The trace as a Chrome trace-event JSON document (what `write_chrome_json` writes).
    pub fn chrome_json(&self) -> Value {
        let spans = self.spans();
        let mut events = Vec::with_capacity(spans.len() + 2 * Track::ALL.len() + 1);
        events.push(json!({
            "name": "process_name", "ph": "M", "pid": 1, "tid": 0,
            "args": {"name": "sirius-offload"}
        }));
        for track in Track::ALL {
            events.push(json!({
                "name": "thread_name", "ph": "M", "pid": 1, "tid": track.tid(),
                "args": {"name": track.name()}
            }));
            events.push(json!({
                "name": "thread_sort_index", "ph": "M", "pid": 1, "tid": track.tid(),
                "args": {"sort_index": track.tid()}
            }));
        }
        for s in spans.iter() {
            let mut event = json!({
                "name": s.name, "cat": s.track.name(), "ph": "X", "pid": 1, "tid": s.track.tid(),
                "ts": s.start_us, "dur": s.dur_us,
            });
            if !s.args.is_null() {
                event["args"] = s.args.clone();
            }
            events.push(event);
        }
        json!({"traceEvents": events, "displayTimeUnit": "ms"})
    }

    /// Per track: spans and busy seconds; and the overall wall span.
    pub fn summary(&self) -> TraceSummary {
        let spans = self.spans();
        let mut per_track: BTreeMap<Track, Vec<(f64, f64)>> = BTreeMap::new();
        let (mut first, mut last) = (f64::INFINITY, f64::NEG_INFINITY);
        for s in spans.iter() {
            let end = s.start_us + s.dur_us;
            first = first.min(s.start_us);
            last = last.max(end);
            per_track
                .entry(s.track)
                .or_default()
                .push((s.start_us, end));
        }
        let tracks = per_track
            .into_iter()
            .map(|(track, mut iv)| TrackSummary {
                track: track.name().to_string(),
                spans: iv.len(),
                busy_s: union_len(&mut iv) / 1e6,
            })
            .collect();
        TraceSummary {
            wall_s: if spans.is_empty() {
                0.0
            } else {
                (last - first) / 1e6
            },
            tracks,
        }
    }

    fn spans(&self) -> MutexGuard<'_, Vec<Span>> {
        // The record is append-only and a push cannot leave it half-written, so a lock poisoned
        // by a panicking recorder still holds valid spans: keep using them rather than lose
        // the trace of the failure.
        self.inner
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Total length covered by the intervals (nested spans, e.g. a layer and its ops, count once).
fn union_len(iv: &mut [(f64, f64)]) -> f64 {
    iv.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for &(s, e) in iv.iter() {
        current = match current {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = current {
        total += ce - cs;
    }
    total
}
