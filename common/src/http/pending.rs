//! The bytes a connection has read but not yet used: the socket is read straight into them, and
//! what a request takes off the front is skipped over rather than moved, so an upload's body is
//! copied once (into its own buffer), not three times (into a read buffer, into `pending`, and
//! down over its head).

use std::ops::Deref;

/// Read bytes `buf[start..end]`; `buf` is all initialised (zeroed once as it grows), so the
/// socket reads into `buf[end..]` without an unsafe view of spare capacity.
#[derive(Default)]
pub(super) struct Pending {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Deref for Pending {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or(&[])
    }
}

impl Pending {
    /// Forgets the first `n` bytes (at most all of them).
    pub(super) fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            // Empty: the next read starts at the front, with the whole buffer to fill.
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads once from `read` into the room after the bytes held, making room first (at least
    /// `step` bytes, the first read's size); the count read (0 at end of stream).
    pub(super) fn read_with<E>(
        &mut self,
        step: usize,
        read: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        self.make_room(step);
        let room = self.buf.get_mut(self.end..).unwrap_or_default();
        let count = read(room)?;
        // A reader never says it read more than it was given; if one did, what it claims past
        // the room is not data.
        self.end = (self.end + count).min(self.buf.len());
        Ok(count)
    }

    /// Makes sure a read has a quarter of `step` at least (a whole `step` into a fresh buffer):
    /// the bytes held move to the front when that is enough, else the buffer doubles.
    fn make_room(&mut self, step: usize) {
        if self.buf.is_empty() {
            self.buf = vec![0u8; step];
            return;
        }
        let least = (step / 4).max(1);
        if self.buf.len() - self.end >= least {
            return;
        }
        self.compact();
        if self.buf.len() - self.end < least {
            let grown = (self.buf.len() * 2).max(self.end + step);
            self.buf.resize(grown, 0);
        }
    }

    /// Gives back what a large head or body grew the buffer to, keeping `keep` bytes (and what
    /// is still held): an idle keep-alive connection should not keep the peak.
    pub(super) fn shrink(&mut self, keep: usize) {
        if self.buf.len() <= 2 * keep {
            return;
        }
        self.compact();
        self.buf.truncate(keep.max(self.end));
        self.buf.shrink_to_fit();
    }

    /// Moves the bytes held to the front of the buffer, so all the room is after them.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    #[cfg(test)]
    fn room(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn feed(pending: &mut Pending, step: usize, data: &[u8]) -> usize {
        pending
            .read_with(step, |room| {
                let n = room.len().min(data.len());
                room[..n].copy_from_slice(&data[..n]);
                Ok::<_, io::Error>(n)
            })
            .unwrap()
    }

    #[test]
    fn consumed_bytes_are_skipped_and_the_rest_kept_in_order() {
        let mut pending = Pending::default();
        assert_eq!(feed(&mut pending, 16, b"GET / HTTP/1.1\r\n"), 16);
        assert_eq!(&*pending, b"GET / HTTP/1.1\r\n");
        pending.consume(4);
        assert_eq!(&*pending, b"/ HTTP/1.1\r\n");
        // Room left is under a quarter of the step: the bytes held move to the front.
        feed(&mut pending, 16, b"abc");
        assert_eq!(&*pending, b"/ HTTP/1.1\r\nabc");
        pending.consume(100);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_full_buffer_grows_and_keeps_its_bytes() {
        let mut pending = Pending::default();
        let data: Vec<u8> = (0..100u8).collect();
        let mut fed = 0;
        while fed < data.len() {
            fed += feed(&mut pending, 8, &data[fed..]);
        }
        assert_eq!(&*pending, &data[..]);
        assert!(pending.room() >= 100);
        pending.consume(90);
        pending.shrink(8);
        assert_eq!(&*pending, &data[90..]);
        assert_eq!(pending.room(), 10);
    }

    #[test]
    fn emptied_buffer_reads_from_the_front_again() {
        let mut pending = Pending::default();
        feed(&mut pending, 8, b"12345678");
        pending.consume(8);
        // All of the step is room again, not the bytes after those consumed.
        assert_eq!(feed(&mut pending, 8, b"abcdefgh"), 8);
        assert_eq!(&*pending, b"abcdefgh");
        assert_eq!(pending.room(), 8);
    }

    #[test]
    fn a_reader_claiming_more_than_its_room_is_held_to_the_room() {
        let mut pending = Pending::default();
        let n = pending.read_with(4, |_| Ok::<_, io::Error>(10)).unwrap();
        assert_eq!(n, 10);
        assert_eq!(pending.len(), 4);
    }
}
