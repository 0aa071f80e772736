//! Small helpers shared by the parallel kernels.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::thread::LocalKey;

/// A `&mut [T]` that several pool tasks write through, each to its own disjoint part.
/// Creating it borrows the slice mutably for `'a`, so nothing else can touch it meanwhile.
#[derive(Clone, Copy)]
pub(super) struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: tasks only write disjoint elements (the contract of `slice` / `ptr` users), and T
// values are moved across threads only as far as `&mut T` would allow.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    pub(super) fn new(s: &'a mut [T]) -> Self {
        SharedMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// `&mut s[start..start + len]`.
    ///
    /// # Safety
    /// No other live reference (from any thread) may overlap the returned range.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(
            start <= self.len && len <= self.len - start,
            "SharedMut::slice out of bounds"
        );
        // SAFETY: in bounds (asserted); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }

    /// Raw pointer to element `start`, for strided writes; bounds are the caller's business
    /// beyond the check that `start` itself is inside.
    pub(super) fn ptr_at(&self, start: usize) -> *mut T {
        assert!(start < self.len, "SharedMut::ptr_at out of bounds");
        // SAFETY: start < len.
        unsafe { self.ptr.add(start) }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }
}

/// Runs `f` with this thread's reusable `Vec` behind `key` (a fresh, empty one if re-entered).
/// The pool's threads live as long as the pool, so buffers are allocated once per thread and
/// reused by every later call.
#[inline]
pub(super) fn with_scratch_vec<R>(
    key: &'static LocalKey<RefCell<Vec<f32>>>,
    f: impl FnOnce(&mut Vec<f32>) -> R,
) -> R {
    let mut f = Some(f);
    let out = key.with(|cell| {
        cell.try_borrow_mut()
            .ok()
            .map(|mut v| (f.take().expect("called once"))(&mut v))
    });
    out.unwrap_or_else(|| (f.take().expect("called once"))(&mut Vec::new()))
}

/// Runs `f` with a thread-local f32 buffer of at least `len` elements (contents unspecified);
/// see [`with_scratch_vec`].
#[inline]
pub(super) fn with_scratch<R>(
    key: &'static LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    with_scratch_vec(key, |buf| {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// Tiny deterministic generator for tests and benches (xorshift64*).
#[cfg(test)]
pub(super) struct TestRng(u64);

#[cfg(test)]
impl TestRng {
    pub(super) fn new(seed: u64) -> Self {
        TestRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub(super) fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub(super) fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
