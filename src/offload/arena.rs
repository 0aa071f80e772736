//! The resident arena: accounting of fast memory (GPU memory; on CPU the `--resident-mem`
//! budget) by label.
//!
//! It allocates nothing itself (the backend does); it is the single place that says yes or no
//! to "may this live in fast memory", so that going over budget through it is impossible. A
//! refusal means the plan and the execution disagree, which is a bug worth a clear message.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::offload::budget::{budget_line_of_label, budget_lines, BudgetLine};

/// Bytes of fast memory (GPU memory; on CPU the --resident-mem budget) handed out by label.
#[derive(Debug, Clone)]
pub struct ResidentArena {
    budget: u64,
    used: u64,
    peak: u64,
    /// Reservation order is kept for reports; the counts are small (a few per layer), so a
    /// linear search is cheaper than keeping a map in step.
    items: Vec<(String, u64)>,
}

/// What stats JSON reports about an arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ArenaSummary {
    /// Bytes the arena may hand out.
    pub budget: u64,
    /// Bytes handed out now.
    pub used: u64,
    /// Most bytes handed out at any time since the arena was made.
    pub peak: u64,
}

impl ResidentArena {
    /// An empty arena that may hand out at most `budget` bytes.
    pub fn new(budget: u64) -> Self {
        ResidentArena {
            budget,
            used: 0,
            peak: 0,
            items: Vec::new(),
        }
    }

    /// Reserves `bytes` under `label` (labels unique; reserving an existing label is an
    /// InvalidArgument error); refuses with Error::ArenaFull when used + bytes > budget, leaving
    /// the arena unchanged.
    pub fn reserve(&mut self, label: impl Into<String>, bytes: u64) -> Result<()> {
        let label = label.into();
        if self.position(&label).is_some() {
            return Err(Error::InvalidArgument(format!(
                "resident arena: `{label}` is already reserved (release or resize it instead)"
            )));
        }
        self.used = self.admit(&label, self.used, bytes)?;
        self.peak = self.peak.max(self.used);
        self.items.push((label, bytes));
        Ok(())
    }

    /// Gives a label's bytes back; returns them (InvalidArgument if the label is unknown).
    pub fn release(&mut self, label: &str) -> Result<u64> {
        let i = self.find(label)?;
        let (_, bytes) = self.items.remove(i);
        self.used -= bytes;
        Ok(bytes)
    }

    /// Changes a label's size (e.g. a resident neuron set that grows or shrinks per request).
    /// Refuses with Error::ArenaFull when the other labels' bytes + `bytes` > budget, leaving
    /// the arena unchanged; the error's `used` is then the other labels' bytes.
    pub fn resize(&mut self, label: &str, bytes: u64) -> Result<()> {
        let i = self.find(label)?;
        let others = self.used - self.items[i].1;
        self.used = self.admit(label, others, bytes)?;
        self.peak = self.peak.max(self.used);
        self.items[i].1 = bytes;
        Ok(())
    }

    /// Reserves `label` or, when it exists, resizes it to `bytes` (a per-request allocation
    /// that replaces the previous request's): same refusal rule as both.
    pub fn set(&mut self, label: &str, bytes: u64) -> Result<()> {
        match self.get(label) {
            Some(_) => self.resize(label, bytes),
            None => self.reserve(label, bytes),
        }
    }

    /// Bytes the arena may hand out.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes handed out now.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Bytes still available.
    pub fn free(&self) -> u64 {
        self.budget - self.used
    }

    /// Most bytes handed out at any time since the arena was made.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Bytes reserved under `label`, if it is reserved.
    pub fn get(&self, label: &str) -> Option<u64> {
        self.position(label).map(|i| self.items[i].1)
    }

    /// (label, bytes) in reservation order, for reports.
    pub fn items(&self) -> Vec<(String, u64)> {
        self.items.clone()
    }

    /// Budget, use and peak for stats JSON.
    /// What is reserved now, summed by budget line (as the plan's `budget_lines`).
    pub fn budget_lines(&self) -> Vec<BudgetLine> {
        budget_lines(
            self.items
                .iter()
                .map(|(label, bytes)| (budget_line_of_label(label), *bytes)),
        )
    }

    pub fn summary(&self) -> ArenaSummary {
        ArenaSummary {
            budget: self.budget,
            used: self.used,
            peak: self.peak,
        }
    }

    /// The new total when `bytes` joins `base` bytes already in use, or the refusal.
    fn admit(&self, label: &str, base: u64, bytes: u64) -> Result<u64> {
        // checked_add: a wrapped sum would slip under the budget.
        match base.checked_add(bytes) {
            Some(total) if total <= self.budget => Ok(total),
            _ => Err(Error::ArenaFull {
                label: label.to_string(),
                requested: bytes,
                used: base,
                budget: self.budget,
            }),
        }
    }

    fn position(&self, label: &str) -> Option<usize> {
        self.items.iter().position(|(l, _)| l == label)
    }

    fn find(&self, label: &str) -> Result<usize> {
        self.position(label).ok_or_else(|| {
            Error::InvalidArgument(format!("resident arena: `{label}` is not reserved"))
        })
    }
}
