//! The series of one shard on their way to the receiver, already encoded as request entries.

use telemeter_common::snappy;

use super::{convert, MAX_SERIES_PER_REQUEST};

/// Series on their way to the receiver, in the order their records were read, already encoded
/// as the entries of a `WriteRequest` ([`convert::encode_series`]): a request body is any run of
/// them, snappy-compressed. Each series carries one sample.
#[derive(Default)]
pub(super) struct Batch {
    bytes: Vec<u8>,
    /// Where each series' entry ends in `bytes`.
    ends: Vec<usize>,
    /// The number of the record each series comes from (non-decreasing).
    pub(super) seqs: Vec<u64>,
    /// The receive time of each series' record, ms since the epoch.
    received: Vec<i64>,
}

impl Batch {
    /// The number of the record the first series comes from.
    pub(super) fn first_record(&self) -> Option<u64> {
        self.seqs.first().copied()
    }

    /// Series (and samples: one each).
    pub(super) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Appends the series of `payload` (protobuf-delimited families) of record `seq`; on a
    /// decoding error nothing of it stays.
    pub(super) fn extend(
        &mut self,
        payload: &[u8],
        seq: u64,
        received_ms: i64,
    ) -> Result<(), telemeter_common::delimited::DecodeError> {
        let (bytes, series) = (self.bytes.len(), self.ends.len());
        let (ends, seqs, received) = (&mut self.ends, &mut self.seqs, &mut self.received);
        let written = convert::encode_payload(payload, received_ms, &mut self.bytes, |end| {
            ends.push(end);
            seqs.push(seq);
            received.push(received_ms);
        });
        if written.is_err() {
            self.bytes.truncate(bytes);
            self.ends.truncate(series);
            self.seqs.truncate(series);
            self.received.truncate(series);
        }
        written
    }

    /// Splits off the series from index `at` on.
    pub(super) fn split_off(&mut self, at: usize) -> Batch {
        let offset = match at.checked_sub(1) {
            Some(last) => self.ends.get(last).copied().unwrap_or(self.bytes.len()),
            None => 0,
        };
        let mut ends = self.ends.split_off(at);
        for end in &mut ends {
            *end -= offset;
        }
        Batch {
            bytes: self.bytes.split_off(offset),
            ends,
            seqs: self.seqs.split_off(at),
            received: self.received.split_off(at),
        }
    }

    /// Removes the series of records numbered below `seq` (a prefix); returns how many.
    pub(super) fn drop_below(&mut self, seq: u64) -> u64 {
        let cut = self.seqs.partition_point(|&s| s < seq);
        if cut > 0 {
            let rest = self.split_off(cut);
            *self = rest;
        }
        cut as u64
    }

    /// Removes the leading series of records received before `cutoff_ms` (records are read in
    /// about the order they were received); returns how many.
    pub(super) fn drop_received_before(&mut self, cutoff_ms: i64) -> u64 {
        let cut = self.received.iter().take_while(|&&r| r < cutoff_ms).count();
        if cut > 0 {
            let rest = self.split_off(cut);
            *self = rest;
        }
        cut as u64
    }

    /// Takes the first `max_samples` series (at least one). What is left is copied into `spare`'s
    /// buffers (emptied first), which become this batch's: a shard that hands each sent batch
    /// back as the next spare keeps reusing the same few buffers instead of allocating a fresh
    /// megabyte per request (each one page-faulted in, then unmapped with a TLB shootdown that
    /// stops every core: a tenth of egress's CPU).
    pub(super) fn take_front(&mut self, max_samples: usize, mut spare: Batch) -> Batch {
        let count = max_samples.clamp(1, MAX_SERIES_PER_REQUEST).min(self.len());
        let offset = match count.checked_sub(1) {
            Some(last) => self.ends.get(last).copied().unwrap_or(self.bytes.len()),
            None => 0,
        };
        spare.clear();
        spare
            .bytes
            .extend_from_slice(self.bytes.get(offset..).unwrap_or_default());
        spare
            .ends
            .extend(self.ends.iter().skip(count).map(|end| end - offset));
        spare
            .seqs
            .extend_from_slice(self.seqs.get(count..).unwrap_or_default());
        spare
            .received
            .extend_from_slice(self.received.get(count..).unwrap_or_default());
        self.bytes.truncate(offset);
        self.ends.truncate(count);
        self.seqs.truncate(count);
        self.received.truncate(count);
        std::mem::replace(self, spare)
    }

    /// Bytes its entry buffer holds without growing.
    pub(super) fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// Empties the batch, keeping its buffers.
    pub(super) fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        self.seqs.clear();
        self.received.clear();
    }

    /// The request body: the entries, snappy block-compressed.
    #[cfg(test)]
    pub(super) fn body(&self) -> Vec<u8> {
        snappy::encode_block(&self.bytes)
    }

    /// The request body written into the start of `body` by `encoder` (both reused from one
    /// request to the next); returns its length. `body` only grows: zeroing a megabyte per request
    /// to shrink it again would cost as much as the page faults the reuse saves.
    pub(super) fn body_into(&self, encoder: &mut snap::raw::Encoder, body: &mut Vec<u8>) -> usize {
        let room = snap::raw::max_compress_len(self.bytes.len());
        if body.len() < room {
            body.resize(room, 0);
        }
        match encoder.compress(&self.bytes, body) {
            Ok(written) => written,
            // Only an input over 4 GiB is refused; a batch is a few megabytes at most.
            Err(_) => {
                *body = snappy::encode_block(&self.bytes);
                body.len()
            }
        }
    }
}

/// `batch` in two halves, in order.
pub(super) fn split(mut batch: Batch) -> (Batch, Batch) {
    let second = batch.split_off(batch.len() / 2);
    (batch, second)
}
