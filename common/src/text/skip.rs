//! Which series a text writer must leave out, and why: a line Prometheus refuses fails the whole
//! scrape, so these rules decide before anything is written.

use crate::model::{Metric, MetricType};
use std::collections::HashSet;
use std::fmt;

use super::write::has_value_for;

/// Why a text writer left a series out. Written, it would be a line Prometheus refuses, and one
/// refused line fails the whole scrape: every cluster on the server would vanish centrally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The family's name is not a valid metric name (or is empty).
    MetricName,
    /// A label name is not a valid label name.
    LabelName,
    /// A label name starts with `__`, which Prometheus reserves (`__name__` would name the
    /// series twice).
    ReservedLabel,
    /// The series carries the label the exposition of its family's type adds to its lines itself
    /// (`le` on a histogram, `quantile` on a summary; see [`type_label`]).
    TypeLabel,
    /// A label name appears twice in the series.
    DuplicateLabel,
    /// The series lacks the value its family's type calls for: there is nothing to write.
    NoValue,
    /// Another source (cluster) served first has a family of the same name with another type:
    /// one name has one type in an exposition, so the later one's series are left out.
    TypeConflict,
}

impl SkipReason {
    /// Every reason, in a stable order.
    pub const ALL: [SkipReason; 7] = [
        SkipReason::MetricName,
        SkipReason::LabelName,
        SkipReason::ReservedLabel,
        SkipReason::TypeLabel,
        SkipReason::DuplicateLabel,
        SkipReason::NoValue,
        SkipReason::TypeConflict,
    ];

    /// The reason as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::MetricName => "metric_name",
            SkipReason::LabelName => "label_name",
            SkipReason::ReservedLabel => "reserved_label",
            SkipReason::TypeLabel => "type_label",
            SkipReason::DuplicateLabel => "duplicate_label",
            SkipReason::NoValue => "no_value",
            SkipReason::TypeConflict => "type_conflict",
        }
    }
}

/// Series a writer left out, by [`SkipReason`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped([u64; SkipReason::ALL.len()]);

impl Skipped {
    /// Counts one series left out for `reason`.
    pub fn add(&mut self, reason: SkipReason) {
        if let Some(n) = self.0.get_mut(reason as usize) {
            *n += 1;
        }
    }

    /// Series left out for `reason`.
    pub fn count(&self, reason: SkipReason) -> u64 {
        self.0.get(reason as usize).copied().unwrap_or(0)
    }

    /// Series left out for any reason.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &Skipped) {
        for (n, more) in self.0.iter_mut().zip(other.0) {
            *n += more;
        }
    }
}

impl fmt::Display for Skipped {
    /// `type_label: 2, reserved_label: 1`: the reasons that occurred, with their counts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut separator = "";
        for reason in SkipReason::ALL {
            let n = self.count(reason);
            if n > 0 {
                write!(f, "{separator}{}: {n}", reason.as_str())?;
                separator = ", ";
            }
        }
        Ok(())
    }
}

/// The label the exposition of a family of `metric_type` adds to its series' lines: `le` on a
/// histogram's buckets, `quantile` on a summary's quantiles. A series carrying it already would
/// repeat it.
pub fn type_label(metric_type: MetricType) -> Option<&'static str> {
    match metric_type {
        MetricType::Histogram | MetricType::GaugeHistogram => Some("le"),
        MetricType::Summary => Some("quantile"),
        MetricType::Counter | MetricType::Gauge | MetricType::Untyped => None,
    }
}

/// Whether label `name` (a valid name) still cannot be written on a series of `metric_type`:
/// [`SkipReason::ReservedLabel`] for a `__` prefix, [`SkipReason::TypeLabel`] for the type's own
/// label. One rule for both ends: validation refuses such series on the way in, and the writers
/// leave out any that got into the store some other way.
pub fn reserved_label(metric_type: MetricType, name: &str) -> Option<SkipReason> {
    reserved_label_bytes(metric_type, name.as_bytes())
}

pub(super) fn reserved_label_bytes(metric_type: MetricType, name: &[u8]) -> Option<SkipReason> {
    if name.starts_with(b"__") {
        Some(SkipReason::ReservedLabel)
    } else if type_label(metric_type).is_some_and(|own| own.as_bytes() == name) {
        Some(SkipReason::TypeLabel)
    } else {
        None
    }
}

/// Why label `name` cannot be written on a series of `metric_type`, duplicates aside.
#[inline]
pub(super) fn label_problem(metric_type: MetricType, name: &[u8]) -> Option<SkipReason> {
    // [`labels::is_valid_label_name`]'s rule, on the bytes: it admits only ASCII, so they need no
    // UTF-8 check first (this runs for every label `/federate` writes).
    let valid = match name.split_first() {
        Some((&first, rest)) => {
            (first.is_ascii_alphabetic() || first == b'_')
                && rest.iter().all(|&b| NAME_BYTES[usize::from(b)])
        }
        None => false,
    };
    if !valid {
        return Some(SkipReason::LabelName);
    }
    reserved_label_bytes(metric_type, name)
}

/// The bytes a label name may hold after its first, `[a-zA-Z0-9_]`, by value: one load a byte
/// instead of three range tests (every label name of every series `/federate` writes is asked).
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        table[b] = byte.is_ascii_alphanumeric() || byte == b'_';
        b += 1;
    }
    table
};

/// Label names kept on the stack per series for the duplicate check; a series with more (rare:
/// validation allows 64) moves them to a set.
pub(super) const KEPT_NAMES: usize = 16;

/// The label names of one series seen so far.
pub(super) struct SeenNames<'a> {
    kept: [&'a [u8]; KEPT_NAMES],
    len: usize,
    more: Option<HashSet<&'a [u8]>>,
}

impl<'a> SeenNames<'a> {
    pub(super) fn new() -> Self {
        SeenNames {
            kept: [&[]; KEPT_NAMES],
            len: 0,
            more: None,
        }
    }

    /// Adds `name`; false when the series had it already.
    #[inline]
    pub(super) fn insert(&mut self, name: &'a [u8]) -> bool {
        if let Some(more) = &mut self.more {
            return more.insert(name);
        }
        // Names are short and mostly of different lengths: compared inline, not by a call to
        // `memcmp` for each pair (a few percent of a `/federate` scrape).
        let same =
            |kept: &&[u8]| kept.len() == name.len() && kept.iter().zip(name).all(|(a, b)| a == b);
        if self
            .kept
            .get(..self.len)
            .unwrap_or_default()
            .iter()
            .any(same)
        {
            return false;
        }
        match self.kept.get_mut(self.len) {
            Some(slot) => {
                *slot = name;
                self.len += 1;
            }
            None => {
                let mut set: HashSet<&[u8]> = self.kept.iter().copied().collect();
                set.insert(name);
                self.more = Some(set);
            }
        }
        true
    }
}

/// Why a series whose label names are `names` (in order) cannot be served in a family of
/// `metric_type`, in text or protobuf, if it cannot: an invalid, reserved or repeated name
/// ([`SkipReason::LabelName`], [`SkipReason::ReservedLabel`], [`SkipReason::TypeLabel`],
/// [`SkipReason::DuplicateLabel`]). The first problem in label order is reported.
pub fn unservable_labels<'a>(
    metric_type: MetricType,
    names: impl IntoIterator<Item = &'a [u8]>,
) -> Option<SkipReason> {
    let mut seen = SeenNames::new();
    for name in names {
        if let Some(problem) = label_problem(metric_type, name) {
            return Some(problem);
        }
        if !seen.insert(name) {
            return Some(SkipReason::DuplicateLabel);
        }
    }
    None
}

/// Why `metric` cannot be written in a family of `metric_type`, if it cannot; checked in the
/// order [`write_family_view`] finds the same problems, so both count them alike.
pub(super) fn series_problem(metric: &Metric, metric_type: MetricType) -> Option<SkipReason> {
    if !has_value_for(metric, metric_type) {
        return Some(SkipReason::NoValue);
    }
    unservable_labels(
        metric_type,
        metric
            .label
            .iter()
            .map(|l| l.name.as_deref().unwrap_or("").as_bytes()),
    )
}
