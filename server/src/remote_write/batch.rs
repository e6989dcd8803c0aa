//! The series of one shard on their way to the receiver, already encoded as request entries.

use std::ops::Range;

use telemeter_common::snappy;

use super::cache::ClusterCache;
use super::{convert, MAX_SERIES_PER_REQUEST};

/// Series on their way to the receiver, in the order their records were read, already encoded
/// as the entries of a `WriteRequest` ([`convert::encode_series`]): a request body is any run of
/// them, snappy-compressed. Each series carries one sample.
#[derive(Default)]
pub(super) struct Batch {
    bytes: Vec<u8>,
    /// Where each series' entry ends in `bytes`.
    ends: Vec<usize>,
    /// The bytes of each series' sample field, the last of its entry (its labels end there).
    samples: Vec<u8>,
    /// The number of the record each series comes from (non-decreasing).
    pub(super) seqs: Vec<u64>,
    /// The receive time of each series' record, ms since the epoch.
    received: Vec<i64>,
    /// Conversion's working space, kept from one record to the next (bounded, see its doc).
    scratch: convert::Scratch,
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
    #[cfg(test)]
    pub(super) fn extend(
        &mut self,
        payload: &[u8],
        seq: u64,
        received_ms: i64,
    ) -> Result<(), telemeter_common::delimited::DecodeError> {
        self.extend_cached(payload, seq, received_ms, None)
    }

    /// [`Batch::extend`], through the cache of the record's cluster and the shard's spare one
    /// when given ([`convert::encode_payload_cached`]).
    pub(super) fn extend_cached(
        &mut self,
        payload: &[u8],
        seq: u64,
        received_ms: i64,
        cache: Option<(&mut ClusterCache, &mut ClusterCache)>,
    ) -> Result<(), telemeter_common::delimited::DecodeError> {
        let (bytes, series) = (self.bytes.len(), self.ends.len());
        let (ends, samples) = (&mut self.ends, &mut self.samples);
        let each = |entries: &[(usize, u8)]| {
            ends.extend(entries.iter().map(|&(end, _)| end));
            samples.extend(entries.iter().map(|&(_, sample)| sample));
        };
        let (out, scratch) = (&mut self.bytes, &mut self.scratch);
        let written = match cache {
            Some((cache, spare)) => convert::encode_payload_cached(
                payload,
                received_ms,
                out,
                each,
                scratch,
                cache,
                spare,
            ),
            None => convert::encode_payload_with(payload, received_ms, out, each, scratch),
        };
        // The record's number and receive time, for each of its series at once rather than
        // pushed one series at a time.
        self.seqs.resize(self.ends.len(), seq);
        self.received.resize(self.ends.len(), received_ms);
        if written.is_err() {
            self.bytes.truncate(bytes);
            self.ends.truncate(series);
            self.samples.truncate(series);
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
            samples: self.samples.split_off(at),
            seqs: self.seqs.split_off(at),
            received: self.received.split_off(at),
            scratch: convert::Scratch::default(),
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
            .samples
            .extend_from_slice(self.samples.get(count..).unwrap_or_default());
        spare
            .seqs
            .extend_from_slice(self.seqs.get(count..).unwrap_or_default());
        spare
            .received
            .extend_from_slice(self.received.get(count..).unwrap_or_default());
        self.bytes.truncate(offset);
        self.ends.truncate(count);
        self.samples.truncate(count);
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
        self.samples.clear();
        self.seqs.clear();
        self.received.clear();
    }

    /// The entries, uncompressed.
    #[cfg(test)]
    pub(super) fn entries(&self) -> &[u8] {
        &self.bytes
    }

    /// The request body: the entries, snappy block-compressed, in a fresh buffer.
    #[cfg(test)]
    pub(super) fn body(&self) -> Vec<u8> {
        let mut body = Vec::new();
        self.body_into(&mut body);
        body
    }

    /// The request body written into `body` (reused from one request to the next: emptied, not
    /// shrunk); returns its length.
    ///
    /// A series repeats most of the label bytes of the one before it (the same labels but one,
    /// or but `__name__`, or but `le`), or of the series at the same place in the record before
    /// (another cluster's upload of the same families: the same labels but `_id`), and where is
    /// known without searching. So its labels are written as copies of what they share, at their
    /// start and at their end, with the better of those two ([`snappy::BlockWriter`]), the rest
    /// as literals: no hash table walks the body as `snap`'s compressor does (a fifth of egress's
    /// CPU). Only series of this request are referred to, so a request cut from a batch anywhere
    /// is whole.
    pub(super) fn body_into(&self, body: &mut Vec<u8>) -> usize {
        body.clear();
        let start_of = |i: usize| match i.checked_sub(1) {
            Some(before) => self.ends.get(before).copied().unwrap_or(0),
            None => 0,
        };
        match snappy::BlockWriter::new(&self.bytes, body) {
            Ok(mut block) => {
                let mut previous = None;
                // The first series of this record and of the record before, by index.
                let (mut record, mut record_before) = (0, None);
                for (i, &end) in self.ends.iter().enumerate() {
                    if i > 0 && self.seqs.get(i) != self.seqs.get(i - 1) {
                        (record, record_before) = (i, Some(record));
                    }
                    let labels = self.labels_of(i, start_of(i)..end);
                    let same_place = record_before
                        .map(|first| first + (i - record))
                        .filter(|&j| j < record)
                        .and_then(|j| self.labels_of(j, start_of(j)..start_of(j + 1)));
                    if let Some(now) = labels.clone() {
                        match (previous, same_place) {
                            // The same series of another cluster first: it differs only in
                            // `_id` when the clusters send the same families.
                            (Some(a), Some(b)) => block.repeat(now, &[b, a]),
                            (Some(a), None) | (None, Some(a)) => block.repeat(now, &[a]),
                            (None, None) => {}
                        }
                    }
                    previous = labels;
                }
                block.finish();
            }
            // Only over 4 GiB, which no request is (its series are capped): the compressor says so.
            Err(_) => *body = snappy::encode_block(&self.bytes),
        }
        body.len()
    }
}

impl Batch {
    /// Where the labels of series `i`, the `WriteRequest.timeseries` entry `bytes[entry]`, are:
    /// after its key and length, before its sample field (as [`convert`] writes it); `None` if
    /// the bytes say otherwise, and the entry is then written as it is.
    fn labels_of(&self, i: usize, entry: Range<usize>) -> Option<Range<usize>> {
        let series = self.bytes.get(entry.clone())?;
        let sample = usize::from(*self.samples.get(i)?);
        let from = match series {
            [0x0a, len, ..] if *len < 0x80 => 2,
            [0x0a, high, low, ..] if *high >= 0x80 && *low < 0x80 => 3,
            [0x0a, _, _, last, ..] if *last < 0x80 => 4,
            _ => return None,
        };
        let to = series.len().checked_sub(sample)?;
        (from <= to && series.get(to) == Some(&0x12))
            .then_some(entry.start + from..entry.start + to)
    }
}

/// `batch` in two halves, in order.
pub(super) fn split(mut batch: Batch) -> (Batch, Batch) {
    let second = batch.split_off(batch.len() / 2);
    (batch, second)
}
