//! Checking a whole family, series and all, as prost would decode it, without building it; and
//! the iterator over a series' quantiles or buckets.

use crate::delimited::DecodeError;

use super::fields::{Bad, Fields};
use super::parse::{family_header, parse_label, simple_value};
use super::{
    COUNTER_FIELD, FAMILY_DEPTH, GAUGE_FIELD, HISTOGRAM_FIELD, ITEM_DEPTH, ITEM_FIELD, LABEL_FIELD,
    METRIC_DEPTH, METRIC_FIELD, SUMMARY_FIELD, TIMESTAMP_FIELD, UNTYPED_FIELD, VALUE_DEPTH,
};

/// The one-byte key of a summary's quantile or a histogram's bucket field (3, length-delimited).
const ITEM_KEY: u8 = ((ITEM_FIELD as u8) << 3) | 2;

/// Checks a whole family message, series and all, and counts its series.
pub(super) fn check_family_message(message: &[u8]) -> Result<usize, Bad> {
    family_header(message)?;
    let mut series = 0;
    let mut fields = Fields::new(message, FAMILY_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        if tag == METRIC_FIELD {
            check_metric(wire.bytes()?)?;
            series += 1;
        }
    }
    Ok(series)
}

pub(super) fn check_metric(message: &[u8]) -> Result<(), Bad> {
    let mut fields = Fields::new(message, METRIC_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            LABEL_FIELD => {
                parse_label(wire.bytes()?)?;
            }
            GAUGE_FIELD | COUNTER_FIELD | UNTYPED_FIELD => {
                simple_value(wire.bytes()?)?;
            }
            SUMMARY_FIELD | HISTOGRAM_FIELD => {
                // Quantile is {1: double, 2: double}; Bucket is {1: uint64, 2: double}.
                let count_first = tag == HISTOGRAM_FIELD;
                let mut fields = Fields::new(wire.bytes()?, VALUE_DEPTH);
                while let Some((tag, wire)) = fields.next()? {
                    match tag {
                        1 => {
                            wire.varint()?;
                        }
                        2 => {
                            wire.double()?;
                        }
                        ITEM_FIELD => check_item(wire.bytes()?, count_first)?,
                        _ => {}
                    }
                }
            }
            TIMESTAMP_FIELD => {
                wire.varint()?;
            }
            _ => {}
        }
    }
    Ok(())
}

pub(super) fn check_item(message: &[u8], count_first: bool) -> Result<(), Bad> {
    let mut fields = Fields::new(message, ITEM_DEPTH);
    while let Some((tag, wire)) = fields.next()? {
        match tag {
            1 if count_first => {
                wire.varint()?;
            }
            1 | 2 => {
                wire.double()?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The items (quantiles or buckets, field 3) of a summary or histogram; of every occurrence of the
/// field in the metric when it appears more than once.
pub(super) struct Items<'a> {
    /// The metric's fields, still to be searched for further occurrences.
    outer: Option<Fields<'a>>,
    outer_tag: u32,
    inner: Fields<'a>,
    done: bool,
}

impl<'a> Items<'a> {
    pub(super) fn new(
        message: &'a [u8],
        merged_from: Option<&'a [u8]>,
        outer_tag: u32,
    ) -> Items<'a> {
        match merged_from {
            Some(metric) => Items {
                outer: Some(Fields::new(metric, METRIC_DEPTH)),
                outer_tag,
                inner: Fields::new(&[], VALUE_DEPTH),
                done: false,
            },
            None => Items {
                outer: None,
                outer_tag,
                inner: Fields::new(message, VALUE_DEPTH),
                done: false,
            },
        }
    }

    #[inline(always)]
    fn next_item(&mut self) -> Result<Option<&'a [u8]>, Bad> {
        // An item written the usual way (every bucket and quantile is a few dozen bytes),
        // without the general field reader.
        if let Some(item) = self.inner.next_short(ITEM_KEY) {
            return Ok(Some(item));
        }
        loop {
            while let Some((tag, wire)) = self.inner.next()? {
                if tag == ITEM_FIELD {
                    return Ok(Some(wire.bytes()?));
                }
            }
            let Some(outer) = &mut self.outer else {
                return Ok(None);
            };
            loop {
                match outer.next()? {
                    None => return Ok(None),
                    Some((tag, wire)) if tag == self.outer_tag => {
                        self.inner = Fields::new(wire.bytes()?, VALUE_DEPTH);
                        break;
                    }
                    Some(_) => {}
                }
            }
        }
    }

    pub(super) fn next<T>(
        &mut self,
        parse: impl FnOnce(&'a [u8]) -> Result<T, Bad>,
    ) -> Option<Result<T, DecodeError>> {
        if self.done {
            return None;
        }
        let item = self
            .next_item()
            .and_then(|item| item.map(parse).transpose());
        self.done = !matches!(item, Ok(Some(_)));
        item.map_err(DecodeError::from).transpose()
    }
}
