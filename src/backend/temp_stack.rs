//! Bookkeeping of a device backend's per-op temporaries: one region allocated up front (and
//! booked in the `--gpu-mem` budget), handed out as a stack.
//!
//! Why a stack is enough: every op queues its kernels on one stream, so a region an op used
//! may be handed to the next op as soon as the first op stops naming it; stream order makes
//! the next op's writes land after the first op's reads. What must not happen is two
//! temporaries alive at once sharing bytes, which a stack rules out. Temporaries may be
//! released in any order: a released one below the top is only marked, and the top drops
//! past it once everything above it is released too.
//!
//! A request the region cannot hold is refused (the caller then allocates, and counts it);
//! the stack remembers the most it was asked for, so a backend without a budget can grow the
//! region to that once it is idle, after which the same work allocates nothing.

/// Every temporary starts on this boundary (the widest access a kernel makes, and what
/// cuMemAlloc guarantees for its own allocations).
pub const TEMP_ALIGN: usize = 256;

/// One live temporary: its place in the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TempGrant {
    pub offset: usize,
    pub bytes: usize,
    id: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    end: usize,
    live: bool,
}

/// The stack over a region of `capacity` bytes.
#[derive(Debug, Default)]
pub struct TempStack {
    capacity: usize,
    entries: Vec<Entry>,
    next_id: u64,
    /// The highest top any request asked for (granted or not).
    high_water: usize,
    /// Requests the region could not hold.
    refused: u64,
}

impl TempStack {
    pub fn new(capacity: usize) -> TempStack {
        TempStack {
            capacity,
            ..TempStack::default()
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes in use up to the top (released temporaries below a live one included).
    pub fn top(&self) -> usize {
        self.entries.last().map_or(0, |e| e.end)
    }

    /// No temporary is alive: the region may be replaced.
    pub fn is_idle(&self) -> bool {
        self.entries.is_empty()
    }

    /// Requests refused so far (each one an allocation by the caller).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The most the region was asked to hold at once.
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    /// `bytes` bytes (rounded up to [`TEMP_ALIGN`]; 0 counts as one unit, so every grant has
    /// an address of its own), or `None` when they do not fit above the top.
    pub fn take(&mut self, bytes: usize) -> Option<TempGrant> {
        let size = bytes.max(1).checked_next_multiple_of(TEMP_ALIGN)?;
        let offset = self.top();
        let end = offset.checked_add(size)?;
        self.high_water = self.high_water.max(end);
        if end > self.capacity {
            self.refused += 1;
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push(Entry {
            id,
            end,
            live: true,
        });
        Some(TempGrant { offset, bytes, id })
    }

    /// Gives `grant` back; the top falls past every released entry at the end.
    pub fn release(&mut self, grant: TempGrant) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == grant.id) {
            e.live = false;
        }
        while self.entries.last().is_some_and(|e| !e.live) {
            self.entries.pop();
        }
    }

    /// The capacity the region should grow to, when idle and it was ever asked for more
    /// than it holds.
    pub fn wanted_growth(&self) -> Option<usize> {
        (self.is_idle() && self.high_water > self.capacity).then_some(self.high_water)
    }

    /// A new region of `capacity` bytes (only while idle: live grants point into the old
    /// one). Returns whether it was applied.
    pub fn resize(&mut self, capacity: usize) -> bool {
        if !self.is_idle() {
            return false;
        }
        self.capacity = capacity;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: &TempGrant, b: &TempGrant) -> bool {
        let end = |g: &TempGrant| g.offset + g.bytes.max(1);
        a.offset < end(b) && b.offset < end(a)
    }

    #[test]
    fn grants_are_aligned_and_disjoint_while_alive() {
        let mut s = TempStack::new(4096);
        let a = s.take(10).unwrap();
        let b = s.take(300).unwrap();
        let c = s.take(0).unwrap();
        for g in [a, b, c] {
            assert_eq!(g.offset % TEMP_ALIGN, 0);
        }
        assert!(!overlaps(&a, &b) && !overlaps(&b, &c) && !overlaps(&a, &c));
        assert_eq!(s.top(), 256 + 512 + 256);
    }

    #[test]
    fn out_of_order_release_keeps_live_grants_covered() {
        let mut s = TempStack::new(4096);
        let a = s.take(256).unwrap();
        let b = s.take(256).unwrap();
        s.release(a);
        // `b` is alive above `a`: the top stays, so a new grant cannot land on `b`.
        assert_eq!(s.top(), 512);
        let c = s.take(256).unwrap();
        assert!(!overlaps(&b, &c));
        s.release(c);
        s.release(b);
        assert!(s.is_idle());
        assert_eq!(s.top(), 0);
        // Reuse from the bottom once everything is back.
        assert_eq!(s.take(1).unwrap().offset, 0);
    }

    #[test]
    fn a_request_past_the_region_is_refused_and_remembered() {
        let mut s = TempStack::new(1024);
        let a = s.take(768).unwrap();
        assert!(s.take(512).is_none());
        assert_eq!(s.refused(), 1);
        assert_eq!(s.high_water(), 768 + 512);
        // Not idle: no growth while `a` points into the region.
        assert_eq!(s.wanted_growth(), None);
        assert!(!s.resize(4096));
        s.release(a);
        assert_eq!(s.wanted_growth(), Some(1280));
        assert!(s.resize(1280));
        let a = s.take(768).unwrap();
        assert!(s.take(512).is_some());
        assert_eq!(a.offset, 0);
        assert_eq!(s.refused(), 1);
    }

    #[test]
    fn a_huge_request_does_not_overflow() {
        let mut s = TempStack::new(1024);
        assert!(s.take(usize::MAX - 10).is_none());
        assert!(s.take(usize::MAX).is_none());
        assert!(s.take(16).is_some());
    }

    #[test]
    fn random_take_release_never_overlaps_live_grants() {
        // A small deterministic generator: no dependency for one loop.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut s = TempStack::new(64 * 1024);
        let mut live: Vec<TempGrant> = Vec::new();
        for _ in 0..20_000 {
            if next() % 3 != 0 || live.is_empty() {
                if let Some(g) = s.take((next() % 5000) as usize) {
                    assert!(g.offset + g.bytes <= s.capacity());
                    assert!(live.iter().all(|l| !overlaps(l, &g)));
                    live.push(g);
                }
            } else {
                let i = (next() as usize) % live.len();
                s.release(live.swap_remove(i));
            }
            assert!(live.iter().all(|g| g.offset + g.bytes.max(1) <= s.top()));
        }
        for g in live.drain(..) {
            s.release(g);
        }
        assert!(s.is_idle());
    }
}
