//! A bounded pool of byte buffers to use again: a fresh buffer for every request or record cost
//! its zeroing and, above the allocator's mmap threshold, a page fault per 4 KiB. Shared by
//! remote-write ingest (decompressed request bodies) and egress (decompressed uploads, taken by
//! the reader and handed back by the shards).

use std::sync::Mutex;

/// Buffers kept for the next use, bounded three ways so that what it pins stays small whoever
/// sends what: at most `max_buffers` buffers, none of more capacity than `max_buffer_bytes` (a
/// few large ones are freed, not kept), and at most `max_bytes` of capacity in all.
pub struct BufferPool {
    kept: Mutex<Vec<Vec<u8>>>,
    max_buffers: usize,
    max_buffer_bytes: usize,
    max_bytes: usize,
}

impl BufferPool {
    /// An empty pool with these bounds.
    pub fn new(max_buffers: usize, max_buffer_bytes: usize, max_bytes: usize) -> BufferPool {
        BufferPool {
            kept: Mutex::new(Vec::new()),
            max_buffers,
            max_buffer_bytes,
            max_bytes,
        }
    }

    /// A buffer used before (its contents are whatever its last user left), or an empty one.
    pub fn take(&self) -> Vec<u8> {
        telemeter_common::sync::lock(&self.kept)
            .pop()
            .unwrap_or_default()
    }

    /// Hands `buffer` back, unless it holds no allocation, is too large to keep, or the pool is
    /// full in buffers or bytes: then it is freed.
    pub fn give(&self, buffer: Vec<u8>) {
        let capacity = buffer.capacity();
        if capacity == 0 || capacity > self.max_buffer_bytes {
            return;
        }
        let mut kept = telemeter_common::sync::lock(&self.kept);
        let bytes: usize = kept.iter().map(Vec::capacity).sum();
        if kept.len() < self.max_buffers && bytes.saturating_add(capacity) <= self.max_bytes {
            kept.push(buffer);
        }
    }

    /// The buffers kept now, and their capacity in all.
    pub fn kept(&self) -> (usize, usize) {
        let kept = telemeter_common::sync::lock(&self.kept);
        (kept.len(), kept.iter().map(Vec::capacity).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_keeps_at_most_its_count_of_buffers_each_at_most_its_size() {
        let pool = BufferPool::new(8, 4096, 1 << 20);
        for _ in 0..3 * 8 {
            pool.give(Vec::with_capacity(1024));
        }
        pool.give(Vec::with_capacity(4097));
        let mut kept = 0;
        // Bounded: the loop ends at the first empty buffer, or after more than it may hold.
        while kept <= 3 * 8 {
            let buffer = pool.take();
            if buffer.capacity() == 0 {
                break;
            }
            assert!(buffer.capacity() <= 4096, "{}", buffer.capacity());
            kept += 1;
        }
        assert_eq!(kept, 8);
        assert_eq!(pool.take().capacity(), 0, "empty: a fresh buffer");
    }

    #[test]
    fn the_pool_keeps_at_most_its_bytes() {
        let pool = BufferPool::new(64, 4096, 10_000);
        for _ in 0..10 {
            pool.give(Vec::with_capacity(4096));
        }
        assert_eq!(pool.kept().0, 2);
        assert!(pool.kept().1 <= 10_000);
    }
}
