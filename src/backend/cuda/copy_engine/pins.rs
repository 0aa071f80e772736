//! The process-wide table of page-locked host spans, kept apart from the driver so that its
//! bookkeeping is tested without a device ([`Pinner`] stands for cuMemHostRegister and
//! cuMemHostUnregister; the copy engine's registry passes the real one).
//!
//! The driver refuses to register a page twice, and two engines on two threads (a server
//! replacing its engine while the old one lives) may stream the same pages. So every
//! registration in the process is an [`Entry`] of one table, entries never overlap, and all
//! of the table's work happens under its lock: looking up what a span overlaps, registering
//! the gaps, counting users, and, when the last user goes, unregistering and removing the
//! entry. Nothing can see an entry between its last user leaving and its pages being
//! unlocked, so no span is registered twice nor unlocked under another user.
//!
//! A span that overlaps existing entries reuses them (one more user each) and registers only
//! the gaps between them; the copy engine then splits a piece that crosses from one entry
//! into the next.

use std::ops::Range;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use memmap2::Mmap;

use crate::error::Result;

/// Page-locks host memory for the copy engine (the driver, or a test double).
pub(super) trait Pinner: Send + Sync {
    /// Locks `span` (whole pages of one mapping): the device address of its first byte
    /// (None when the device cannot map host memory), or why the driver refused.
    fn register(&self, span: &Range<usize>) -> Result<std::result::Result<Option<u64>, String>>;
    /// Unlocks the span that `register` locked at `start` (failures are the driver's to log).
    fn unregister(&self, start: usize);
}

/// One registered span.
struct Entry {
    span: Range<usize>,
    device: Option<u64>,
    users: usize,
    /// Who registered it, to unregister it (on the device it was registered with).
    pinner: Arc<dyn Pinner>,
    /// Keeps the pages mapped while they are locked.
    _map: Arc<Mmap>,
}

/// Every registration of the process (or of a test), sorted by start, never overlapping.
#[derive(Default)]
pub(super) struct PinTable {
    entries: Vec<Entry>,
}

pub(super) type SharedPins = Arc<Mutex<PinTable>>;

/// The process's table.
pub(super) fn process_pins() -> SharedPins {
    static PINS: LazyLock<SharedPins> = LazyLock::new(SharedPins::default);
    PINS.clone()
}

fn lock(table: &SharedPins) -> MutexGuard<'_, PinTable> {
    // The table's invariants hold between statements that can panic, so a poisoned lock
    // still guards a consistent table.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// One user's share of an entry: the entry stays registered while a lease on it lives.
pub(super) struct Lease {
    table: SharedPins,
    pub span: Range<usize>,
    /// The device address of `span.start` (None: DMA only).
    pub device: Option<u64>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        let Some(i) = t
            .entries
            .iter()
            .position(|e| e.span.start == self.span.start)
        else {
            return;
        };
        let e = &mut t.entries[i];
        e.users = e.users.saturating_sub(1);
        if e.users == 0 {
            // Under the lock: nobody can reuse the entry from now until its pages are
            // unlocked (a new registration of them waits for the lock).
            let e = t.entries.remove(i);
            e.pinner.unregister(e.span.start);
        }
    }
}

/// What [`acquire`] got for a span.
#[derive(Default)]
pub(super) struct Acquired {
    /// New leases: on existing entries the caller did not hold yet, and on the gaps it
    /// registered.
    pub leases: Vec<Lease>,
    /// Gaps the driver refused, with its reason (their pages are gathered on the host).
    pub refused: Vec<(Range<usize>, String)>,
}

/// Leases covering `span` (whole pages of `map`): existing entries it overlaps are reused,
/// except those `held` says the caller leases already; the gaps between them are
/// registered by `pinner`, all under the table's lock.
pub(super) fn acquire(
    table: &SharedPins,
    span: Range<usize>,
    map: &Arc<Mmap>,
    pinner: &Arc<dyn Pinner>,
    held: &dyn Fn(usize) -> bool,
) -> Result<Acquired> {
    let mut taken: Vec<(Range<usize>, Option<u64>)> = Vec::new();
    let mut refused = Vec::new();
    let outcome = {
        let mut t = lock(table);
        t.cover(span, map, pinner, held, &mut taken, &mut refused)
    };
    // Made after the lock is released: a lease dropped on the error path below locks it.
    let leases = (taken.into_iter())
        .map(|(span, device)| Lease {
            table: table.clone(),
            span,
            device,
        })
        .collect();
    outcome.map(|()| Acquired { leases, refused })
}

impl PinTable {
    /// [`acquire`] under the lock: pushes what it leased to `taken` as it goes, so that an
    /// error part-way still hands every counted use back to a lease.
    fn cover(
        &mut self,
        span: Range<usize>,
        map: &Arc<Mmap>,
        pinner: &Arc<dyn Pinner>,
        held: &dyn Fn(usize) -> bool,
        taken: &mut Vec<(Range<usize>, Option<u64>)>,
        refused: &mut Vec<(Range<usize>, String)>,
    ) -> Result<()> {
        let mut at = span.start;
        let mut i = self.entries.partition_point(|e| e.span.end <= span.start);
        while at < span.end {
            let next = self.entries.get(i).filter(|e| e.span.start < span.end);
            let gap_end = next.map_or(span.end, |e| e.span.start.max(at));
            if at < gap_end {
                let gap = at..gap_end;
                match pinner.register(&gap)? {
                    Ok(device) => {
                        self.entries.insert(
                            i,
                            Entry {
                                span: gap.clone(),
                                device,
                                users: 1,
                                pinner: pinner.clone(),
                                _map: map.clone(),
                            },
                        );
                        taken.push((gap, device));
                        i += 1;
                    }
                    Err(why) => refused.push((gap, why)),
                }
                at = gap_end;
                continue;
            }
            let Some(e) = self.entries.get_mut(i) else {
                break;
            };
            if !held(e.span.start) {
                e.users += 1;
                taken.push((e.span.clone(), e.device));
            }
            at = e.span.end;
            i += 1;
        }
        Ok(())
    }

    /// Spans registered now and their users (tests).
    #[cfg(test)]
    fn spans(&self) -> Vec<(Range<usize>, usize)> {
        (self.entries.iter())
            .map(|e| (e.span.clone(), e.users))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts calls; refuses spans starting at `refuse`; fails if a page is locked twice.
    #[derive(Default)]
    struct Counting {
        registered: AtomicUsize,
        unregistered: AtomicUsize,
        locked: Mutex<Vec<Range<usize>>>,
        refuse: Option<usize>,
    }

    impl Pinner for Counting {
        fn register(
            &self,
            span: &Range<usize>,
        ) -> Result<std::result::Result<Option<u64>, String>> {
            if Some(span.start) == self.refuse {
                return Ok(Err("refused".into()));
            }
            let mut locked = self.locked.lock().unwrap();
            assert!(
                locked
                    .iter()
                    .all(|s| s.end <= span.start || span.end <= s.start),
                "{span:?} registered twice (locked: {locked:?})"
            );
            locked.push(span.clone());
            self.registered.fetch_add(1, Ordering::SeqCst);
            Ok(Ok(Some(span.start as u64 + (1 << 40))))
        }

        fn unregister(&self, start: usize) {
            let mut locked = self.locked.lock().unwrap();
            let i = locked
                .iter()
                .position(|s| s.start == start)
                .expect("unlocked twice");
            locked.remove(i);
            self.unregistered.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn map() -> Arc<Mmap> {
        let m = memmap2::MmapOptions::new().len(4096).map_anon().unwrap();
        Arc::new(m.make_read_only().unwrap())
    }

    fn counts(p: &Counting) -> (usize, usize) {
        (
            p.registered.load(Ordering::SeqCst),
            p.unregistered.load(Ordering::SeqCst),
        )
    }

    #[test]
    fn overlapping_spans_reuse_entries_and_register_only_gaps() {
        let (table, map) = (SharedPins::default(), map());
        let counting = Arc::new(Counting::default());
        let pinner: Arc<dyn Pinner> = counting.clone();
        let none = |_: usize| false;
        let a = acquire(&table, 4096..12288, &map, &pinner, &none).unwrap();
        let b = acquire(&table, 8192..20480, &map, &pinner, &none).unwrap();
        // The second reuses the first's entry and registers 12288..20480 only.
        assert_eq!(counts(&counting), (2, 0));
        let spans: Vec<_> = b.leases.iter().map(|l| l.span.clone()).collect();
        assert_eq!(spans, vec![4096..12288, 12288..20480]);
        assert_eq!(b.leases[1].device, Some(12288 + (1 << 40)));
        assert_eq!(
            lock(&table).spans(),
            vec![(4096..12288, 2), (12288..20480, 1)]
        );
        drop(a);
        assert_eq!(counts(&counting), (2, 0), "still used by the second");
        drop(b);
        assert_eq!(counts(&counting), (2, 2));
        assert!(lock(&table).spans().is_empty());
    }

    #[test]
    fn entries_a_caller_holds_are_not_counted_twice_and_gaps_fill_between() {
        let (table, map) = (SharedPins::default(), map());
        let counting = Arc::new(Counting::default());
        let pinner: Arc<dyn Pinner> = counting.clone();
        let none = |_: usize| false;
        let first = acquire(&table, 0..4096, &map, &pinner, &none).unwrap();
        let third = acquire(&table, 8192..12288, &map, &pinner, &none).unwrap();
        let held = |start: usize| start == 0;
        let all = acquire(&table, 0..16384, &map, &pinner, &held).unwrap();
        let spans: Vec<_> = all.leases.iter().map(|l| l.span.clone()).collect();
        assert_eq!(spans, vec![4096..8192, 8192..12288, 12288..16384]);
        assert_eq!(
            lock(&table).spans(),
            vec![
                (0..4096, 1),
                (4096..8192, 1),
                (8192..12288, 2),
                (12288..16384, 1)
            ]
        );
        drop((first, third, all));
        assert_eq!(counts(&counting), (4, 4));
    }

    #[test]
    fn a_refused_gap_is_reported_and_not_entered() {
        let (table, map) = (SharedPins::default(), map());
        let counting = Arc::new(Counting {
            refuse: Some(4096),
            ..Counting::default()
        });
        let pinner: Arc<dyn Pinner> = counting.clone();
        let none = |_: usize| false;
        let got = acquire(&table, 4096..8192, &map, &pinner, &none).unwrap();
        assert!(got.leases.is_empty());
        assert_eq!(got.refused[0].0, 4096..8192);
        assert!(lock(&table).spans().is_empty());
        assert_eq!(counts(&counting), (0, 0));
    }

    #[test]
    fn engines_on_two_threads_never_lock_a_page_twice_nor_unlock_a_used_one() {
        let (table, map) = (SharedPins::default(), map());
        let counting = Arc::new(Counting::default());
        let pinner: Arc<dyn Pinner> = counting.clone();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (table, map, pinner) = (table.clone(), map.clone(), pinner.clone());
                std::thread::spawn(move || {
                    for i in 0..200 {
                        // Overlapping spans of different lengths, acquired and dropped.
                        let start = 4096 * ((i + t) % 3);
                        let end = start + 4096 * (1 + (i * 7 + t) % 4);
                        let none = |_: usize| false;
                        let got = acquire(&table, start..end, &map, &pinner, &none).unwrap();
                        let mut covered = start;
                        for l in &got.leases {
                            assert!(l.span.start <= covered, "a hole at {covered}");
                            covered = covered.max(l.span.end);
                        }
                        assert!(covered >= end);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (registered, unregistered) = counts(&counting);
        assert_eq!(registered, unregistered);
        assert!(registered > 0);
        assert!(lock(&table).spans().is_empty());
    }
}
