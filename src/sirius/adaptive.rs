//! The adaptive window (`--period auto`): each chain window's K chosen from what the request
//! has measured so far, instead of one K for the whole run.
//!
//! A window of K costs K - 1 drafts and one verification of K tokens, and advances
//! `1 + a + a^2 + ... + a^(K-1)` tokens on average when each draft is accepted with
//! probability `a` (independently, the usual speculative-decoding model). Which K pays depends
//! on the hardware: where decoding reads weights (a GPU, an offloaded run) a verification
//! costs about one step whatever K is and long windows win; where a window's products bound
//! it (a CPU with little compute per byte of bandwidth) a verification costs nearly K steps
//! and the shortest windows, or none (K = 1: the full model alone), win. So the planner
//! measures both: the acceptance rate (counts that fade, so a change in the text shows within
//! a few windows) and the seconds of a whole window (drafts and verification) per length,
//! interpolated between the lengths it has tried (a window's drafts do not all cost alike:
//! offloaded, the first after a full pass waits for the sparse layers' copies), and picks
//! the K with the most tokens per second. It tries the lengths 1, 2, 4, ... up to the maximum
//! first, stopping early when the next one, extrapolated from those measured, could not win
//! even with every draft accepted (so a machine where long windows cost too much pays for no
//! long window), then every
//! [`REPROBE_EVERY`] windows a neighbour of the best K (half or double it, in turn), so
//! costs that grow with the context and a changing acceptance rate stay current at a small
//! price (re-measuring far lengths, K = 16 from K = 1, would waste most of a window's work).
//!
//! An offloaded run knows more before its first window: the planner's predicted seconds of a
//! window at each length ([`PeriodPlanner::prime`]). Those stand in for the first probes
//! (each of which, offloaded, is a pass that streams the FFN complement), and each is
//! replaced, not averaged, by the first measurement of its length.
//!
//! Because K follows measured time, two runs of the same prompt may choose different windows
//! and (Sirius's output depends on where windows end) differ in their text; a fixed
//! `--period` is reproducible.

/// Every this many windows, one window re-measures a neighbour of the best K.
pub const REPROBE_EVERY: usize = 24;
/// Fade of the acceptance counts per window (about the last 10 windows count).
const ACCEPTANCE_FADE: f64 = 0.9;
/// Prior of the acceptance rate: this many accepted and rejected drafts before any window.
const PRIOR_ACCEPTED: f64 = 4.0;
const PRIOR_REJECTED: f64 = 1.0;
/// Weight of a new timing in its moving average.
const TIMING_WEIGHT: f64 = 0.3;
/// The first probes stop at a length whose extrapolated rate with every draft accepted is
/// below this share of the best expected one.
const PROBE_WORTH: f64 = 0.9;

/// What one chain window did (the corrector's measurements of it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowOutcome {
    /// Tokens verified (x0 and the drafts): the window's K.
    pub period: usize,
    /// Drafts the full model accepted (at most `period - 1`).
    pub accepted: usize,
    pub draft_seconds: f64,
    pub verify_seconds: f64,
}

/// Chooses each window's K in `1..=max` (see the module doc).
#[derive(Debug, Clone)]
pub struct PeriodPlanner {
    max: usize,
    accepted: f64,
    rejected: f64,
    /// Moving average of a window's seconds (drafts and verification), by its length - 1.
    window_seconds: Vec<Option<f64>>,
    /// The lengths measured first, shortest first.
    probes: Vec<usize>,
    /// The first probes are over (all measured, or the rest not worth a window).
    probed: bool,
    /// Lengths whose seconds are still the planner's prediction ([`PeriodPlanner::prime`]).
    predicted: Vec<bool>,
    windows: usize,
}

impl PeriodPlanner {
    /// A planner of windows of at most `max` tokens (at least 1).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        let mut probes = Vec::new();
        let mut k = 1;
        while k < max {
            probes.push(k);
            k *= 2;
        }
        probes.push(max);
        PeriodPlanner {
            max,
            accepted: PRIOR_ACCEPTED,
            rejected: PRIOR_REJECTED,
            window_seconds: vec![None; max],
            probes,
            probed: false,
            predicted: vec![false; max],
            windows: 0,
        }
    }

    /// Takes predicted seconds of a window at each given length in `1..=max` (others are
    /// ignored) in place of the first probes: windows start at the best predicted K, and the
    /// re-measurements of neighbours go on as usual. A length's first measurement replaces
    /// its prediction.
    pub fn prime(&mut self, predicted: &[(usize, f64)]) {
        for &(k, seconds) in predicted {
            if (1..=self.max).contains(&k) && seconds.is_finite() && seconds > 0.0 {
                self.window_seconds[k - 1] = Some(seconds);
                self.predicted[k - 1] = true;
            }
        }
        self.probed = self.predicted.iter().any(|&p| p);
    }

    /// The next window's K: a probe length not measured yet, a re-measurement every
    /// [`REPROBE_EVERY`] windows, else the K with the most expected tokens per second.
    pub fn next_period(&mut self) -> usize {
        if !self.probed {
            match self.next_probe() {
                Some(k) => return k,
                None => self.probed = true,
            }
        }
        let best = self.best_period();
        if self.windows % REPROBE_EVERY == REPROBE_EVERY - 1 {
            let (half, double) = ((best / 2).max(1), (best * 2).min(self.max));
            let up = (self.windows / REPROBE_EVERY).is_multiple_of(2);
            return match (up && double != best) || half == best {
                true => double,
                false => half,
            };
        }
        best
    }

    /// The next first probe, if one is left and worth a window: the first two always are;
    /// a longer one while its extrapolated rate with every draft accepted is within
    /// [`PROBE_WORTH`] of the best expected rate.
    fn next_probe(&self) -> Option<usize> {
        let measured = |k: usize| self.window_seconds[k - 1].is_some();
        let k = *self.probes.iter().find(|&&k| !measured(k))?;
        let tried = self.probes.iter().filter(|&&k| measured(k)).count();
        let best = self.expected_rate(self.best_period()).unwrap_or(0.0);
        let at_best = self.window(k).map_or(f64::INFINITY, |t| k as f64 / t);
        (tried < 2 || at_best >= PROBE_WORTH * best).then_some(k)
    }

    /// Takes in what a window did.
    pub fn observe(&mut self, w: &WindowOutcome) {
        let k = w.period.clamp(1, self.max);
        let drafted = k - 1;
        let accepted = w.accepted.min(drafted);
        // A window without drafts says nothing about acceptance: the counts fade only with
        // windows that drafted.
        if drafted > 0 {
            self.accepted = self.accepted * ACCEPTANCE_FADE + accepted as f64;
            let rejected = if accepted < drafted { 1.0 } else { 0.0 };
            self.rejected = self.rejected * ACCEPTANCE_FADE + rejected;
        }
        // A request's first window pays one-off costs (decode copies built on first use,
        // caches warming): its seconds are not kept, so its length is measured again.
        let seconds = w.draft_seconds + w.verify_seconds;
        if self.windows > 0 && seconds.is_finite() && seconds >= 0.0 {
            let slot = &mut self.window_seconds[k - 1];
            let old = match std::mem::take(&mut self.predicted[k - 1]) {
                true => None,
                false => *slot,
            };
            *slot = Some(moving_average(old, seconds));
        }
        self.windows += 1;
    }

    /// The estimated probability that a draft is accepted.
    pub fn acceptance(&self) -> f64 {
        self.accepted / (self.accepted + self.rejected)
    }

    /// Expected tokens per second of windows of `k` (None before any window).
    pub fn expected_rate(&self, k: usize) -> Option<f64> {
        let k = k.clamp(1, self.max);
        let cost = self.window(k)?;
        let a = self.acceptance();
        let tokens: f64 = (0..k as i32).map(|i| a.powi(i)).sum();
        Some(tokens / cost.max(f64::MIN_POSITIVE))
    }

    /// The K in `1..=max` with the highest expected rate (the maximum before any timing).
    pub fn best_period(&self) -> usize {
        let mut best = (self.max, f64::NEG_INFINITY);
        for k in 1..=self.max {
            if let Some(rate) = self.expected_rate(k) {
                if rate > best.1 {
                    best = (k, rate);
                }
            }
        }
        best.0
    }

    /// A window's seconds at length `k`: measured, interpolated between the nearest
    /// measured lengths below and above, or extrapolated along the two nearest below (never
    /// below the nearest: a longer window costs at least as much).
    fn window(&self, k: usize) -> Option<f64> {
        let at = |n: usize| self.window_seconds.get(n - 1).copied().flatten();
        if let Some(t) = at(k) {
            return Some(t);
        }
        let mut below = (1..k).rev().filter_map(|n| at(n).map(|t| (n, t)));
        let mut above = (k + 1..=self.max).filter_map(|n| at(n).map(|t| (n, t)));
        let line = |(n0, t0): (usize, f64), (n1, t1): (usize, f64)| {
            t0 + (k as f64 - n0 as f64) * (t1 - t0) / (n1 as f64 - n0 as f64)
        };
        match (below.next(), above.next()) {
            (Some(lo), Some(hi)) => Some(line(lo, hi)),
            (Some(lo), None) => Some(match below.next() {
                Some(lower) => line(lower, lo).max(lo.1),
                None => lo.1,
            }),
            (None, Some(hi)) => Some(hi.1),
            (None, None) => None,
        }
    }
}

fn moving_average(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(old) => old + TIMING_WEIGHT * (new - old),
        None => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `windows` windows against a machine where a draft costs `draft` and a
    /// verification of n tokens `verify(n)`, every draft accepted with the given pattern.
    fn drive(
        planner: &mut PeriodPlanner,
        windows: usize,
        draft: f64,
        verify: impl Fn(usize) -> f64,
        accept_all: bool,
    ) -> Vec<usize> {
        (0..windows)
            .map(|_| {
                let k = planner.next_period();
                let accepted = if accept_all { k - 1 } else { (k - 1).min(1) };
                planner.observe(&WindowOutcome {
                    period: k,
                    accepted,
                    draft_seconds: draft * (k - 1) as f64,
                    verify_seconds: verify(k),
                });
                k
            })
            .collect()
    }

    #[test]
    fn predicted_window_costs_replace_the_first_probes() {
        // Predicted: a window of k costs 0.05 (k - 1) + 1 (long windows pay); the machine
        // agrees. Without probes the first window is already the longest.
        let mut p = PeriodPlanner::new(8);
        let predicted: Vec<(usize, f64)> =
            (1..=8).map(|k| (k, 0.05 * (k - 1) as f64 + 1.0)).collect();
        p.prime(&predicted);
        let ks = drive(&mut p, 5, 0.05, |_| 1.0, true);
        assert_eq!(ks, vec![8; 5]);
        // Out-of-range lengths and bad seconds are ignored; nothing valid: the probes stay.
        let mut q = PeriodPlanner::new(4);
        q.prime(&[(0, 1.0), (9, 1.0), (2, f64::NAN), (3, -1.0)]);
        assert_eq!(drive(&mut q, 2, 0.3, |_| 1.0, true), vec![1, 1]);
    }

    #[test]
    fn a_measurement_replaces_a_wrong_prediction_at_once() {
        // Predicted cheap long windows; the machine verifies n tokens in n steps (a CPU).
        let mut p = PeriodPlanner::new(8);
        let predicted: Vec<(usize, f64)> =
            (1..=8).map(|k| (k, 0.05 * (k - 1) as f64 + 1.0)).collect();
        p.prime(&predicted);
        let ks = drive(&mut p, 12, 0.7, |n| n as f64, true);
        // The first window's seconds are dropped (one-off costs); the second K = 8 window's
        // replace the prediction, and the planner walks down to the lengths that pay.
        assert_eq!(&ks[..2], &[8, 8]);
        assert!(ks[2] < 8, "{ks:?}");
        assert!(
            p.window(8).is_some_and(|t| t > 10.0),
            "measured, not averaged"
        );
    }

    #[test]
    fn probes_powers_of_two_up_to_the_maximum_where_long_windows_pay() {
        let mut p = PeriodPlanner::new(16);
        let ks = drive(&mut p, 6, 0.2, |_| 1.0, true);
        // The first window's seconds are not kept: K = 1 is measured again.
        assert_eq!(ks, vec![1, 1, 2, 4, 8, 16]);
    }

    #[test]
    fn stops_probing_where_long_windows_clearly_lose() {
        // Verification ~n steps: after 1 and 2, a window of 4 extrapolates to a loss.
        let mut p = PeriodPlanner::new(16);
        let ks = drive(&mut p, 7, 0.7, |n| n as f64, true);
        assert_eq!(&ks[..3], &[1, 1, 2]);
        assert!(ks[3..].iter().all(|&k| k == 1), "{ks:?}");
    }

    #[test]
    fn long_windows_where_a_verification_costs_one_step() {
        // A GPU-like machine: drafts at 0.3 of a step, a verification one step whatever K.
        let mut p = PeriodPlanner::new(16);
        let ks = drive(&mut p, 40, 0.3, |_| 1.0, true);
        assert!(p.acceptance() > 0.9, "acceptance {}", p.acceptance());
        assert_eq!(p.best_period(), 16);
        let exploiting: Vec<_> = ks[5..].iter().filter(|&&k| k == 16).collect();
        assert!(exploiting.len() >= 30, "{ks:?}");
    }

    #[test]
    fn no_drafting_where_a_verification_costs_k_steps() {
        // A compute-bound CPU: a verification of n tokens costs ~n steps; drafts 0.7.
        let mut p = PeriodPlanner::new(16);
        drive(&mut p, 40, 0.7, |n| 0.2 + 0.8 * n as f64, true);
        assert_eq!(p.best_period(), 1);
    }

    #[test]
    fn long_windows_when_only_the_first_draft_is_dear() {
        // Offloaded: the first draft after a full pass waits for copies (0.18 s), the later
        // ones do not (0.07 s); a verification streams the rest whatever K (0.16 s + a bit).
        let mut p = PeriodPlanner::new(16);
        let ks: Vec<usize> = (0..30)
            .map(|_| {
                let k = p.next_period();
                let drafts = match k {
                    1 => 0.0,
                    _ => 0.18 + 0.07 * (k - 2) as f64,
                };
                p.observe(&WindowOutcome {
                    period: k,
                    accepted: k - 1,
                    draft_seconds: drafts,
                    verify_seconds: 0.16 + 0.012 * k as f64,
                });
                k
            })
            .collect();
        assert!(ks.contains(&8), "probed past 2: {ks:?}");
        assert!(
            p.best_period() >= 8,
            "best {} after {ks:?}",
            p.best_period()
        );
    }

    #[test]
    fn short_windows_when_drafts_are_often_rejected() {
        // Verification cheap, but only the first draft of a window is ever kept.
        let mut p = PeriodPlanner::new(16);
        drive(&mut p, 60, 0.2, |n| 1.0 + 0.01 * n as f64, false);
        assert!(p.acceptance() < 0.6, "acceptance {}", p.acceptance());
        let k = p.best_period();
        assert!((2..=4).contains(&k), "best K {k}");
    }

    #[test]
    fn reprobes_a_neighbour_every_so_often() {
        let mut p = PeriodPlanner::new(8);
        let ks = drive(&mut p, 3 + 3 * REPROBE_EVERY, 0.7, |n| n as f64, true);
        // After probing 1 and 2 it settles on K = 1, re-measuring K = 2 now and then.
        let late = &ks[3..];
        let twos = late.iter().filter(|&&k| k == 2).count();
        assert_eq!(twos, 3, "{ks:?}");
        assert_eq!(late.iter().filter(|&&k| k == 1).count(), late.len() - 3);
        // Settled on the maximum, it re-measures half of it.
        let mut p = PeriodPlanner::new(8);
        let ks = drive(&mut p, 5 + 2 * REPROBE_EVERY, 0.1, |_| 1.0, true);
        let late = &ks[5..];
        assert_eq!(late.iter().filter(|&&k| k == 4).count(), 2, "{ks:?}");
    }

    #[test]
    fn interpolates_untried_lengths() {
        let mut p = PeriodPlanner::new(9);
        // The first window's seconds are not kept (one-off costs): 100 s is ignored.
        for (k, t) in [(1, 100.0), (1, 1.0), (3, 2.0), (9, 5.0)] {
            p.observe(&WindowOutcome {
                period: k,
                accepted: k - 1,
                draft_seconds: 0.0,
                verify_seconds: t,
            });
        }
        assert_eq!(p.window(6), Some(3.5));
        assert_eq!(p.window(9), Some(5.0));
        let mut q = PeriodPlanner::new(9);
        for (k, t) in [(1, 7.0), (1, 1.0), (2, 1.5)] {
            q.observe(&WindowOutcome {
                period: k,
                accepted: k - 1,
                draft_seconds: 0.0,
                verify_seconds: t,
            });
        }
        assert_eq!(q.window(4), Some(2.5), "extrapolated along 1 and 2");
    }

    #[test]
    fn windows_without_drafts_leave_the_acceptance_alone() {
        let mut p = PeriodPlanner::new(4);
        let outcome = |period, accepted| WindowOutcome {
            period,
            accepted,
            draft_seconds: 0.1,
            verify_seconds: 1.0,
        };
        p.observe(&outcome(4, 1));
        let a = p.acceptance();
        for _ in 0..10_000 {
            p.observe(&outcome(1, 0));
        }
        assert_eq!(p.acceptance(), a);
        assert!(a.is_finite() && a > 0.0 && a < 1.0);
    }

    #[test]
    fn a_window_of_one_is_the_most_a_maximum_of_one_allows() {
        let mut p = PeriodPlanner::new(1);
        assert_eq!(drive(&mut p, 3, 0.5, |_| 1.0, true), vec![1, 1, 1]);
    }
}
