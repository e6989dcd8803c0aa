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

    /// Takes the first `max_samples` series (at least one).
    pub(super) fn take_front(&mut self, max_samples: usize) -> Batch {
        let count = max_samples.clamp(1, MAX_SERIES_PER_REQUEST).min(self.len());
        let rest = self.split_off(count);
        std::mem::replace(self, rest)
    }

    /// The request body: the entries, snappy block-compressed.
    pub(super) fn body(&self) -> Vec<u8> {
        snappy::encode_block(&self.bytes)
    }
}

/// `batch` in two halves, in order.
pub(super) fn split(mut batch: Batch) -> (Batch, Batch) {
    let second = batch.split_off(batch.len() / 2);
    (batch, second)
}
