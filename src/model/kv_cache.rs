//! The key/value cache: one K and one V buffer per layer, `capacity` rows of kv_dim elements
//! stored as the cache's [`KvDType`].

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::KvDType;

pub struct KvCache<B: Backend> {
    pub(crate) keys: Vec<B::KvBuf>,
    pub(crate) values: Vec<B::KvBuf>,
    len: usize,
    capacity: usize,
    /// Elements per row (kv heads * head dim).
    row_len: usize,
    dtype: KvDType,
}

impl<B: Backend> KvCache<B> {
    pub fn new(
        backend: &B,
        num_layers: usize,
        kv_dim: usize,
        capacity: usize,
        dtype: KvDType,
    ) -> Result<Self> {
        let mut keys = Vec::with_capacity(num_layers);
        let mut values = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            keys.push(backend.alloc_kv(capacity * kv_dim, dtype)?);
            values.push(backend.alloc_kv(capacity * kv_dim, dtype)?);
        }
        Ok(KvCache {
            keys,
            values,
            len: 0,
            capacity,
            row_len: kv_dim,
            dtype,
        })
    }

    /// How the rows are stored.
    pub fn dtype(&self) -> KvDType {
        self.dtype
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Layer `li`'s key and value buffers (`[capacity, kv_dim]`; rows past `len()` are stale).
    pub fn layer(&self, li: usize) -> Option<(&B::KvBuf, &B::KvBuf)> {
        Some((self.keys.get(li)?, self.values.get(li)?))
    }

    /// Forgets every position from `len` on (rollback); the rows are overwritten later.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Fills this empty cache with `src`'s rows (a shared prompt prefix computed once).
    pub fn seed_from(&mut self, backend: &B, src: &KvCache<B>) -> Result<()> {
        if self.len != 0
            || src.len > self.capacity
            || src.row_len != self.row_len
            || src.keys.len() != self.keys.len()
            || src.dtype != self.dtype
        {
            return Err(Error::InvalidArgument(format!(
                "cannot seed a cache of {} layers x {} rows ({} filled, {} {} each) with {} \
                 layers x {} rows of {} {}",
                self.keys.len(),
                self.capacity,
                self.len,
                self.row_len,
                self.dtype,
                src.keys.len(),
                src.len,
                src.row_len,
                src.dtype
            )));
        }
        let pairs =
            (self.keys.iter_mut().zip(&src.keys)).chain(self.values.iter_mut().zip(&src.values));
        for (dst, from) in pairs {
            backend.copy_kv_rows(from, dst, src.len, self.row_len)?;
        }
        self.len = src.len;
        Ok(())
    }

    /// Keeps, of the rows from `start` on, only `rows` (ascending), moved down to
    /// `start..start + rows.len()` in that order: the accepted path of a token tree becomes
    /// plain sequence rows again.
    pub fn keep_rows(&mut self, backend: &B, start: usize, rows: &[usize]) -> Result<()> {
        let ordered = rows.windows(2).all(|w| w[0] < w[1]);
        if !ordered
            || start > self.len
            || rows.first().is_some_and(|&r| r < start)
            || rows.last().is_some_and(|&r| r >= self.len)
        {
            return Err(Error::InvalidArgument(format!(
                "cache rows {rows:?} to keep from row {start} must ascend within {start}..{}",
                self.len
            )));
        }
        for (i, &row) in rows.iter().enumerate() {
            if row != start + i {
                for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
                    backend.move_kv_rows(buf, row, start + i, 1, self.row_len)?;
                }
            }
        }
        self.len = start + rows.len();
        Ok(())
    }

    /// Checks that `n` more positions fit.
    pub(crate) fn check_room(&self, n: usize) -> Result<()> {
        if self.len + n > self.capacity {
            return Err(Error::ContextFull {
                needed: self.len + n,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
