//! GPU-side timing of the copy engine: how long copies ran on the copy stream, and how long
//! the compute stream stood waiting for them (the stall the planner tries to hide).
//!
//! Each measurement is a pair of timed events recorded around the work on its stream; the
//! pair is read once both have completed, without blocking the host (`collect`), or at
//! `finish`, which waits. Events come from a free list, so a pass records without creating
//! any after the first few layers.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::memory::{Event, Stream};
use crate::error::Result;

/// What a measurement times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Span {
    /// A host-to-device copy, on the copy stream (from its start to its end, so time the
    /// stream spent waiting for a buffer to come free is not counted).
    Copy,
    /// The compute stream waiting for a copy (from its previous work's end to the copy's).
    Stall,
}

pub(super) struct Timings {
    device: Arc<CudaDevice>,
    free: Vec<Event>,
    open: VecDeque<(Span, Event, Event)>,
    copy_ms: f64,
    stall_ms: f64,
}

impl Timings {
    pub fn new(device: &Arc<CudaDevice>) -> Timings {
        Timings {
            device: device.clone(),
            free: Vec::new(),
            open: VecDeque::new(),
            copy_ms: 0.0,
            stall_ms: 0.0,
        }
    }

    /// Records the start of a measurement on `stream`.
    pub fn start(&mut self, stream: &Stream) -> Result<Event> {
        let event = match self.free.pop() {
            Some(e) => e,
            None => Event::timed(&self.device)?,
        };
        event.record(stream)?;
        Ok(event)
    }

    /// Records the end of the measurement `start` began, on the same stream.
    pub fn stop(&mut self, span: Span, start: Event, stream: &Stream) -> Result<()> {
        let end = match self.free.pop() {
            Some(e) => e,
            None => Event::timed(&self.device)?,
        };
        end.record(stream)?;
        self.open.push_back((span, start, end));
        Ok(())
    }

    /// Two timed events for a measurement another thread records (the copy thread's uploads),
    /// handed back with [`Timings::push`].
    pub fn pair(&mut self) -> Result<(Event, Event)> {
        let mut take = || match self.free.pop() {
            Some(e) => Ok(e),
            None => Event::timed(&self.device),
        };
        Ok((take()?, take()?))
    }

    /// A measurement recorded elsewhere (both events recorded on one stream, start first).
    pub fn push(&mut self, span: Span, (start, end): (Event, Event)) {
        self.open.push_back((span, start, end));
    }

    /// Adds up the measurements that have completed, oldest first, without blocking.
    pub fn collect(&mut self) -> Result<()> {
        while let Some((_, _, end)) = self.open.front() {
            if !end.is_complete()? {
                break;
            }
            self.take_front()?;
        }
        Ok(())
    }

    /// Waits for every open measurement and adds it up.
    pub fn finish(&mut self) -> Result<()> {
        while let Some((_, _, end)) = self.open.front() {
            end.synchronize()?;
            self.take_front()?;
        }
        Ok(())
    }

    /// Seconds of copies and of compute stalls measured so far.
    pub fn totals(&self) -> (f64, f64) {
        (self.copy_ms / 1e3, self.stall_ms / 1e3)
    }

    /// Forgets the totals (measurements still open count towards the next ones).
    pub fn reset(&mut self) {
        self.copy_ms = 0.0;
        self.stall_ms = 0.0;
    }

    fn take_front(&mut self) -> Result<()> {
        let Some((span, start, end)) = self.open.pop_front() else {
            return Ok(());
        };
        // The end completed after the start on the same stream, so both are complete.
        let ms = Event::elapsed_ms(&start, &end)?.max(0.0) as f64;
        match span {
            Span::Copy => self.copy_ms += ms,
            Span::Stall => self.stall_ms += ms,
        }
        self.free.push(start);
        self.free.push(end);
        Ok(())
    }
}
