//! The buffers the reader decompresses uploads into, handed back by the shards once converted.

use crossbeam_channel::{Receiver, Sender};

/// Buffers the pool keeps, at most: as many as two shards' queues hold, enough for the reader
/// to find one nearly always (8 shards take them back about as fast as it reads).
pub(super) const POOL_BUFFERS: usize = 2 * super::SHARD_QUEUE;
/// A buffer of more capacity than this is freed, not kept: the usual uploads are far smaller
/// (about 51 KB decompressed for 500 samples), and a few large ones must not pin memory.
pub(super) const POOL_BUFFER_BYTES: usize = 256 << 10;

/// Decompression buffers for the reader to use again
/// ([`crate::store::BacklogReader::next_record_into`]): a fresh zeroed buffer for each upload,
/// allocated by the reader and freed on a shard's thread, cost egress 3 % of its CPU. Bounded: at most [`POOL_BUFFERS`] buffers of at most [`POOL_BUFFER_BYTES`]
/// each wait in it (16 MiB; about 3 MiB for the usual uploads). Cheap to clone.
#[derive(Clone)]
pub(super) struct BufferPool {
    kept: Sender<Vec<u8>>,
    waiting: Receiver<Vec<u8>>,
}

impl BufferPool {
    pub(super) fn new() -> BufferPool {
        let (kept, waiting) = crossbeam_channel::bounded(POOL_BUFFERS);
        BufferPool { kept, waiting }
    }

    /// A buffer used before, or an empty one (allocated by its first use).
    pub(super) fn take(&self) -> Vec<u8> {
        self.waiting.try_recv().unwrap_or_default()
    }

    /// Hands `buffer` back, unless the pool is full or the buffer too large to keep.
    pub(super) fn give(&self, buffer: Vec<u8>) {
        if buffer.capacity() > 0 && buffer.capacity() <= POOL_BUFFER_BYTES {
            // Full: it is freed.
            let _ = self.kept.try_send(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_keeps_at_most_its_count_of_buffers_each_at_most_its_size() {
        let pool = BufferPool::new();
        for _ in 0..3 * POOL_BUFFERS {
            pool.give(Vec::with_capacity(1024));
        }
        pool.give(Vec::with_capacity(POOL_BUFFER_BYTES + 1));
        let mut kept = 0;
        // Bounded: the loop ends at the first empty buffer, or after more than it may hold.
        while kept <= 3 * POOL_BUFFERS {
            let buffer = pool.take();
            if buffer.capacity() == 0 {
                break;
            }
            assert!(
                buffer.capacity() <= POOL_BUFFER_BYTES,
                "{}",
                buffer.capacity()
            );
            kept += 1;
        }
        assert_eq!(kept, POOL_BUFFERS);
        assert_eq!(pool.take().capacity(), 0, "empty: a fresh buffer");
    }
}
