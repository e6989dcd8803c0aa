//! The fast path of validation: a protobuf-delimited body checked on its wire views, without
//! decoding it into owned values, to tell whether it can be stored exactly as it came.

use std::collections::BTreeMap;
use std::mem::size_of;
use std::time::SystemTime;

use telemeter_common::bytes::same_bytes;
use telemeter_common::delimited;
use telemeter_common::labels;
use telemeter_common::model::{Bucket, LabelPair, MetricType, Quantile};
use telemeter_common::selector::{self, Selector};
use telemeter_common::text;
use telemeter_common::wire::{self, FamilyHead, MetricView, Value};

use super::Rules;

/// What [`Rules::check_wire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireCheck {
    /// The body is valid and [`Rules::apply`] would store exactly its families, with the same
    /// series and labels: it can be stored as it is.
    Unchanged {
        /// Series in the body.
        series: usize,
        /// Samples in the body (counted as `MetricFamily::sample_count` counts them).
        samples: usize,
        /// Bytes decoding it would allocate for label, quantile and bucket structs (as the
        /// upload's pre-decode scan counts them, so the same cap can be applied without it).
        element_bytes: usize,
        /// The newest sample's timestamp, which the store's TTL counts from: the value
        /// `wire::newest_timestamp` reads from the body, known here without a second walk of
        /// it. Never absent: a body taken unchanged has a timestamp on every series.
        newest_sample_ms: i64,
    },
    /// The body needs the owned path: it has to be rewritten (a token label to stamp, `--label`,
    /// series the whitelist may drop, an empty family), or it is refused, and the owned path says why in the very
    /// words it always has.
    Owned,
}

impl Rules {
    /// The fast path of an upload: validates a protobuf-delimited `body` on its wire views (no
    /// decoding into owned values) with `limits` (those the owned decoder would get), and says
    /// whether it can be stored unchanged. Upstream clients and ours stamp the partition label
    /// themselves, so a valid upload usually can.
    ///
    /// Only a `WireCheck::Unchanged` is a decision: it is given only when [`Rules::apply`] would
    /// accept the decoded body without changing a series. Anything else (including every kind of
    /// invalid body) is `WireCheck::Owned`, so refusals keep their statuses and messages exactly.
    pub fn check_wire(
        &self,
        body: &[u8],
        limits: &delimited::Limits,
        token_labels: &BTreeMap<String, String>,
        now: SystemTime,
    ) -> WireCheck {
        if !self.extra_labels.is_empty() {
            return WireCheck::Owned;
        }
        // One whitelist for the whole upload, as on the owned path.
        let whitelist = self.whitelist.current();
        let now_ms = telemeter_common::time::sample_millis(now);
        let bounds = (
            now_ms.saturating_sub(telemeter_common::time::duration_millis(self.max_sample_age)),
            now_ms.saturating_add(telemeter_common::time::duration_millis(
                self.max_future_skew,
            )),
        );
        // One pass reads every field the owned decoder would (the views check each message as it
        // is read, and every series, label, quantile and bucket is read below), so a body it
        // accepts decodes too.
        let token = TokenNames::new(token_labels);
        let mut total = Counted::default();
        // Kept for the whole upload: its families' series share most labels (`_id`, `instance`,
        // `job`), at the same positions.
        let mut seen = SeenLabels::default();
        // Each family read only up to its series, which the check reads next: the series are
        // walked once, not once more for the family's fields after them.
        for head in wire::family_heads(body, limits) {
            let Ok(head) = head else {
                return WireCheck::Owned;
            };
            let family = head.family;
            if !whitelist.is_empty() && !keeps_whole_family(&whitelist, family.name) {
                return WireCheck::Owned;
            }
            if self
                .check_wire_family(&head, &token, bounds, &mut seen, &mut total)
                .is_none()
            {
                return WireCheck::Owned;
            }
            if total.series > limits.max_series {
                return WireCheck::Owned;
            }
        }
        if total.samples > self.max_samples || total.series == 0 {
            return WireCheck::Owned;
        }
        // Some series was read, and each has a timestamp: there is a newest one.
        let Some(newest_sample_ms) = total.newest else {
            return WireCheck::Owned;
        };
        WireCheck::Unchanged {
            newest_sample_ms,
            series: total.series,
            samples: total.samples,
            element_bytes: total
                .labels
                .saturating_mul(size_of::<LabelPair>())
                .saturating_add(total.quantiles.saturating_mul(size_of::<Quantile>()))
                .saturating_add(total.buckets.saturating_mul(size_of::<Bucket>())),
        }
    }

    /// One family on the fast path: `Some` when it passes every check unchanged; what it holds
    /// is added to `total`.
    fn check_wire_family<'a>(
        &self,
        head: &FamilyHead<'a>,
        token: &TokenNames<'_>,
        (oldest, newest): (i64, i64),
        seen: &mut SeenLabels<'a>,
        total: &mut Counted,
    ) -> Option<()> {
        let family = &head.family;
        labels::check_metric_name(family.name).ok()?;
        let kind = match family.raw_type {
            None => MetricType::Untyped,
            Some(value) => MetricType::try_from(value).ok()?,
        };
        // The label the exposition of this type sets itself ([`text::reserved_label`]'s rule).
        let type_label = text::type_label(kind).map_or(Name::NONE, |n| Name::new(n.as_bytes()));
        let mut previous_ts = i64::MIN;
        let mut series = 0usize;
        let mut metrics = head.metrics();
        // The series before was another family's: its labels were not checked against this
        // family's type label.
        seen.run_labels = 0;
        while let Some(next) = metrics.next_series() {
            let mut next = next.ok()?;
            // The labels this series starts with that are byte for byte the series before's
            // (`_id`, `instance`, `job`, ...) passed every check there: passed over at once.
            let message = next.message();
            let start = seen.resume(message);
            next.pass_labels(start.bytes);
            // The labels first, as the series is read: the run of them it starts with is walked
            // once, by this check, not passed over to find the value and walked again.
            let run = check_wire_labels(
                std::iter::from_fn(|| next.next_label().map(Ok)),
                message,
                start,
                &type_label,
                token,
                seen,
            )?;
            let (metric, all_given) = next.finish().ok()?;
            seen.run = message;
            seen.run_labels = run.count.min(KEPT_NAMES);
            // Labels elsewhere too (none is, as every encoder writes a series): all of them.
            let labels = if all_given {
                run
            } else {
                // Positions that are not the run's: nothing for the next series to resume.
                seen.run_labels = 0;
                check_wire_labels(
                    metric.label_messages(),
                    metric.message,
                    Resume::START,
                    &type_label,
                    token,
                    seen,
                )?
            };
            // Sorted labels rule out duplicates at once, and so do the names of the series
            // before at the same positions. Clients that stamp `_id` append it, so unsorted is
            // common too: names whose keys all differ differ. Only names sharing
            // their first eight bytes (or more names than kept) need the labels read again and
            // compared whole.
            if labels.may_repeat && repeats_a_name(&metric)? {
                return None;
            }
            seen.distinct(&labels);
            // Every token label present (no duplicates, so each was counted once).
            if labels.token != token.labels().len() {
                return None;
            }
            series += 1;
            count_wire_samples(&metric, kind, total)?;
            let ts = metric.timestamp_ms?;
            if ts < oldest || ts > newest || ts < previous_ts {
                return None;
            }
            previous_ts = ts;
            total.labels = total.labels.saturating_add(labels.count);
        }
        // A name, help or type after a series (no encoder writes one there) may be the one
        // that counts: doubtful, so left to the owned path.
        if metrics.read_family_field() {
            return None;
        }
        total.series = total.series.saturating_add(series);
        // An empty family is dropped by the owned path: the body would change.
        if series == 0 {
            return None;
        }
        // The timestamps were checked not to decrease, so the family's newest is its last: one
        // comparison per family, none per series.
        total.newest = total.newest.max(Some(previous_ts));
        Some(())
    }
}

/// Whether the whitelist keeps every series of a family named `name` whatever their labels:
/// some selector that matches on `__name__` alone selects it. Decided once per family instead
/// of once per series; a family it cannot decide so (a selector on other labels, or none that
/// selects the name) is left to the owned path, which may drop some of its series.
fn keeps_whole_family(whitelist: &[Selector], name: &str) -> bool {
    whitelist.iter().any(|selector| {
        selector
            .matchers
            .iter()
            .all(|m| m.name == selector::METRIC_NAME_LABEL)
            && selector.matches(name, &[])
    })
}

/// What the fast path counted so far.
#[derive(Default)]
struct Counted {
    series: usize,
    samples: usize,
    labels: usize,
    quantiles: usize,
    buckets: usize,
    /// The largest timestamp of the families read.
    newest: Option<i64>,
}

/// Counts the samples (and quantiles or buckets) of one series whose value field is the one
/// `kind` calls for (and the only one); `None` otherwise.
fn count_wire_samples(
    metric: &MetricView<'_>,
    kind: MetricType,
    total: &mut Counted,
) -> Option<()> {
    let samples = match (metric.value, kind) {
        (Value::Gauge(_), MetricType::Gauge)
        | (Value::Counter(_), MetricType::Counter)
        | (Value::Untyped(_), MetricType::Untyped) => 1,
        (Value::Summary(summary), MetricType::Summary) => {
            let mut n = 0usize;
            for quantile in summary.quantiles() {
                quantile.ok()?;
                n += 1;
            }
            total.quantiles = total.quantiles.saturating_add(n);
            n + 2
        }
        (Value::Histogram(histogram), MetricType::Histogram | MetricType::GaugeHistogram) => {
            let mut n = 0usize;
            for bucket in histogram.buckets() {
                bucket.ok()?;
                n += 1;
            }
            total.buckets = total.buckets.saturating_add(n);
            n + 2
        }
        _ => return None,
    };
    total.samples = total.samples.saturating_add(samples);
    Some(())
}

/// Label names kept per series for the duplicate check without re-reading the labels.
const KEPT_NAMES: usize = 16;

/// A valid label name with its key: its first eight bytes, big-endian and zero-padded. A valid
/// name holds no zero byte, so two names compare as their keys do wherever the keys differ, and
/// order and equality are nearly always settled by one integer comparison instead of a call to
/// `memcmp` (which was a sixth of the fast path's time, measured).
#[derive(Clone, Copy)]
struct Name<'a> {
    key: u64,
    bytes: &'a [u8],
}

impl<'a> Name<'a> {
    const NONE: Name<'static> = Name { key: 0, bytes: b"" };

    #[inline(always)]
    fn new(bytes: &'a [u8]) -> Name<'a> {
        let key = match bytes.first_chunk::<8>() {
            Some(head) => u64::from_be_bytes(*head),
            None => {
                let packed = bytes.iter().fold(0u64, |key, &b| key << 8 | u64::from(b));
                // Shorter than 8 bytes, so the shift is below 64 (at most 64 for an empty name,
                // whose key is 0 either way).
                packed
                    .checked_shl(8 * (8 - bytes.len() as u32))
                    .unwrap_or(0)
            }
        };
        Name { key, bytes }
    }

    /// The same name.
    #[inline(always)]
    fn is(&self, other: &Name<'_>) -> bool {
        // Equal keys of names up to eight bytes are equal names (no zero byte); longer ones
        // compare the rest.
        self.key == other.key
            && self.bytes.len() == other.bytes.len()
            && self.bytes.get(8..) == other.bytes.get(8..)
    }

    /// Sorts strictly before `other`, as `str` orders them.
    #[inline(always)]
    fn precedes(&self, other: &Name<'_>) -> bool {
        self.key < other.key || (self.key == other.key && self.bytes < other.bytes)
    }

    /// Starts with `__`, the prefix reserved for Prometheus.
    #[inline(always)]
    fn is_reserved(&self) -> bool {
        self.key >> 48 == u64::from(u16::from_be_bytes(*b"__"))
    }
}

/// What every series of an upload is held to on the fast path: the token's labels, as names
/// with keys, taken once per upload rather than once per label. Held inline (a token has one or
/// two labels), so the upload's check allocates nothing for them.
pub(super) struct TokenNames<'t> {
    inline: [(Name<'t>, &'t str); INLINE_TOKEN_LABELS],
    len: usize,
    /// All of them, when there are more than fit inline.
    more: Vec<(Name<'t>, &'t str)>,
}

/// Token labels held without an allocation.
const INLINE_TOKEN_LABELS: usize = 4;

impl<'t> TokenNames<'t> {
    pub(super) fn new(token_labels: &'t BTreeMap<String, String>) -> TokenNames<'t> {
        let mut names = TokenNames {
            inline: [(Name::NONE, ""); INLINE_TOKEN_LABELS],
            len: 0,
            more: Vec::new(),
        };
        let all = token_labels
            .iter()
            .map(|(name, value)| (Name::new(name.as_bytes()), value.as_str()));
        if token_labels.len() > INLINE_TOKEN_LABELS {
            names.more = all.collect();
        } else {
            for (slot, label) in names.inline.iter_mut().zip(all) {
                *slot = label;
                names.len += 1;
            }
        }
        names
    }

    /// The token's labels and their values.
    #[inline(always)]
    fn labels(&self) -> &[(Name<'t>, &'t str)] {
        if self.more.is_empty() {
            self.inline.get(..self.len).unwrap_or_default()
        } else {
            &self.more
        }
    }
}

/// A label that passed its own checks in this upload, at its position in the series before.
#[derive(Clone, Copy)]
struct SeenLabel<'a> {
    /// The encoded label message.
    message: &'a [u8],
    name: Name<'a>,
    /// Whether it is one of the token's labels (with the token's value).
    token: bool,
}

/// The labels of the upload's previous series, by position: the series of an upload mostly share
/// labels (cluster, job, instance, ...) at the same positions, and a label byte for byte the same
/// as one already checked passes the same checks, so only its position in this series (order,
/// repeats, count) and the type's own label (which differs from family to family) are checked
/// again. A label with the same name and another value has only its value checked again.
///
/// It also remembers how many labels the previous series had when they were found to have
/// distinct names: a series whose labels have, position by position, the same names as those
/// has distinct names too, and its unsorted labels need no duplicate check of their own (the
/// benchmark's series are all unsorted: `_id`, `instance`, `job`, `cpu`, `mode`).
///
/// It also keeps where each label of the previous series of the family ended, and what the check
/// had found up to there: a series that starts with the same bytes as that one, up to the end of
/// a label, resumes the check after it ([`SeenLabels::resume`]) instead of reading those labels
/// one by one (three of the benchmark's five labels a series, ~60 bytes).
#[derive(Default)]
struct SeenLabels<'a> {
    labels: [Option<SeenLabel<'a>>; KEPT_NAMES],
    /// By position, what the check had read of the previous series up to and with that label.
    read: [ReadTo; KEPT_NAMES],
    /// `Some(label count)` when the names in `labels` are those of the previous series, all of
    /// them (at most [`KEPT_NAMES`]), and were found distinct ([`SeenLabels::distinct`]).
    distinct: Option<usize>,
    /// The previous series of this family, when it was read by its run of labels: its message,
    run: &'a [u8],
    /// and how many of its first labels `read` holds (0: none to resume from).
    run_labels: usize,
}

/// What [`check_wire_labels`] had read of a series up to and with one of its labels.
#[derive(Clone, Copy, Default)]
struct ReadTo {
    /// The label name's key (for the duplicate check of unsorted names).
    key: u64,
    /// Where the label's field ends in the series' message.
    end: usize,
    /// The names so far sorted.
    sorted: bool,
    /// The token's labels so far.
    found: usize,
}

/// Where [`check_wire_labels`] starts a series: its first `count` labels, `bytes` of its
/// message, already known to pass, with the state the check had after them.
#[derive(Clone, Copy)]
struct Resume<'a> {
    count: usize,
    bytes: usize,
    sorted: bool,
    found: usize,
    previous: Name<'a>,
}

impl Resume<'_> {
    /// At the first label.
    const START: Resume<'static> = Resume {
        count: 0,
        bytes: 0,
        sorted: true,
        found: 0,
        previous: Name::NONE,
    };
}

impl<'a> SeenLabels<'a> {
    /// Records that the series just read by [`check_wire_labels`], `read`, has distinct names.
    fn distinct(&mut self, read: &LabelsRead) {
        self.distinct = (read.count <= KEPT_NAMES).then_some(read.count);
    }

    /// Where the check of a series of the same family as the one before, `message`, starts: after
    /// the labels it starts with that are that series' first labels byte for byte (keys and
    /// lengths included, so the same fields). Those labels are that series' at the same
    /// positions, checked against the same type label and token: they pass again, leave the
    /// slots as they are, and the check after them is where it was in that series after them.
    #[inline(always)]
    fn resume(&self, message: &[u8]) -> Resume<'a> {
        let Some(last) = self.run_labels.checked_sub(1) else {
            return Resume::START;
        };
        let run_end = self.read.get(last).map_or(0, |read| read.end);
        let same = same_prefix_len(message, self.run.get(..run_end).unwrap_or_default());
        let count = self
            .read
            .get(..self.run_labels)
            .unwrap_or_default()
            .iter()
            .take_while(|read| read.end <= same)
            .count();
        let (Some(at), Some(Some(label))) = (
            count.checked_sub(1).and_then(|at| self.read.get(at)),
            count.checked_sub(1).and_then(|at| self.labels.get(at)),
        ) else {
            return Resume::START;
        };
        Resume {
            count,
            bytes: at.end,
            sorted: at.sorted,
            found: at.found,
            previous: label.name,
        }
    }
}

/// How many bytes `a` and `b` start with in common: eight at a time, a series' label run being
/// some sixty bytes.
#[inline(always)]
fn same_prefix_len(a: &[u8], b: &[u8]) -> usize {
    let mut same = 0usize;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let (Some(x), Some(y)) = (x.first_chunk::<8>(), y.first_chunk::<8>()) else {
            break;
        };
        let differ = u64::from_le_bytes(*x) ^ u64::from_le_bytes(*y);
        if differ != 0 {
            // The lowest set bit is in the first byte that differs.
            return same + (differ.trailing_zeros() / 8) as usize;
        }
        same += 8;
    }
    let tail = a.get(same..).unwrap_or_default();
    same + tail
        .iter()
        .zip(b.get(same..).unwrap_or_default())
        .take_while(|(x, y)| x == y)
        .count()
}

/// [`labels::check_series_labels`], [`check_servable`] and the token labels on the wire, over a
/// series' encoded label `messages` (fields of its message `series`), after the labels `start`
/// says passed already: `Some` when every label is valid and servable in a family
/// whose type sets `type_label` itself, with what the caller still has to check (repeated names,
/// every token label there). A token label is counted only with the token's value. An empty
/// value is sent to the owned path, which alone can tell an absent value (refused) from an empty
/// one. `seen` holds the labels of the upload's previous series, and takes this one's.
///
/// [`check_servable`]: super::check_servable
// Inlined into the family's loop, once per series: called, it spilled and reloaded its state
// around every series.
#[inline(always)]
fn check_wire_labels<'a>(
    messages: impl Iterator<Item = Result<&'a [u8], delimited::DecodeError>>,
    series: &[u8],
    start: Resume<'a>,
    type_label: &Name<'_>,
    token: &TokenNames<'_>,
    seen: &mut SeenLabels<'a>,
) -> Option<LabelsRead> {
    let mut count = start.count;
    let mut sorted = start.sorted;
    let mut previous = start.previous;
    let mut found = start.found;
    // Where each label's field ends in the series' message: what the next series resumes from.
    let series_start = series.as_ptr() as usize;
    // Taken: the slots change below, and only the caller knows whether these names are distinct.
    let distinct_before = seen.distinct.take();
    // Every name so far the one at its position in the series before.
    let mut names_as_before = true;
    for message in messages {
        let message = message.ok()?;
        let slot = seen.labels.get_mut(count);
        let before = slot.as_deref().copied().flatten();
        let label = match before {
            // Checked before against another family's type label, maybe: that one check again.
            Some(label) if same_bytes(label.message, message) => {
                if label.name.is(type_label) {
                    return None;
                }
                label
            }
            _ => {
                let (label, same_name) = check_wire_label(message, before, type_label, token)?;
                names_as_before &= same_name;
                if let Some(slot) = slot {
                    *slot = Some(label);
                }
                label
            }
        };
        let name = label.name;
        count += 1;
        if count > labels::MAX_LABELS {
            return None;
        }
        sorted &= count == 1 || previous.precedes(&name);
        previous = name;
        found += usize::from(label.token);
        if let Some(read) = seen.read.get_mut(count - 1) {
            *read = ReadTo {
                key: name.key,
                end: (message.as_ptr() as usize + message.len()).wrapping_sub(series_start),
                sorted,
                found,
            };
        }
    }
    // The names of a series found distinct, at the same positions, and no more of them (a
    // count within the slots): distinct.
    let as_before = names_as_before && distinct_before == Some(count);
    Some(LabelsRead {
        count,
        token: found,
        may_repeat: !sorted
            && !as_before
            && (count > KEPT_NAMES || repeats(seen.read.get(..count).unwrap_or_default())),
    })
}

/// What [`check_wire_labels`] found of a series' labels, each valid on its own.
#[derive(Clone, Copy)]
struct LabelsRead {
    /// Labels.
    count: usize,
    /// The token's labels among them, each with the token's value.
    token: usize,
    /// Whether two names may be the same: they have to be compared whole.
    may_repeat: bool,
}

/// Whether two labels of `metric` have the same name (`None` when a label cannot be read).
fn repeats_a_name(metric: &MetricView<'_>) -> Option<bool> {
    for (i, label) in metric.labels().enumerate() {
        let (name, _) = label.ok()?;
        if metric
            .labels()
            .skip(i + 1)
            .any(|l| l.is_ok_and(|(n, _)| n == name))
        {
            return Some(true);
        }
    }
    Some(false)
}

/// The checks of one label on its own: a valid name, not reserved nor the type's own label, a
/// value present and not too long, and the token's value if it is a token label.
#[inline(always)]
fn check_wire_label<'a>(
    message: &'a [u8],
    before: Option<SeenLabel<'a>>,
    type_label: &Name<'_>,
    token: &TokenNames<'_>,
) -> Option<(SeenLabel<'a>, bool)> {
    // The name unchecked for UTF-8: the label-name rule below admits only ASCII.
    let (name_bytes, value) = wire::label_unchecked_name(message).ok()?;
    if value.is_empty() || value.len() > labels::MAX_VALUE_BYTES {
        return None;
    }
    // The same name as the label checked before at this position (`mode` of
    // `node_cpu_seconds_total`, whose value changes every series), and not the token's: its
    // name passed every rule of a name then, so only the type's own label is checked again.
    if let Some(before) = before {
        if !before.token && same_bytes(before.name.bytes, name_bytes) {
            if before.name.is(type_label) {
                return None;
            }
            return Some((
                SeenLabel {
                    message,
                    name: before.name,
                    token: false,
                },
                true,
            ));
        }
    }
    if name_bytes.len() > labels::MAX_NAME_BYTES || !labels::is_valid_label_name_bytes(name_bytes) {
        return None;
    }
    let name = Name::new(name_bytes);
    if name.is_reserved() || name.is(type_label) {
        return None;
    }
    let token = match token.labels().iter().find(|(n, _)| n.is(&name)) {
        Some((_, expected)) if *expected != value => return None,
        Some(_) => true,
        None => false,
    };
    Some((
        SeenLabel {
            message,
            name,
            token,
        },
        false,
    ))
}

/// True when a name's key appears twice in `read`.
#[inline]
fn repeats(read: &[ReadTo]) -> bool {
    read.iter().enumerate().any(|(i, a)| {
        read.get(i + 1..)
            .unwrap_or_default()
            .iter()
            .any(|b| b.key == a.key)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_prefix_len_is_where_the_first_byte_differs() {
        for n in 0..40usize {
            let a: Vec<u8> = (0..n as u8).map(|b| b.wrapping_mul(29) | 1).collect();
            assert_eq!(same_prefix_len(&a, &a), n, "{n}");
            for m in 0..n {
                assert_eq!(same_prefix_len(&a, &a[..m]), m, "{n} {m}");
                assert_eq!(same_prefix_len(&a[..m], &a), m, "{n} {m}");
            }
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x80;
                assert_eq!(same_prefix_len(&a, &b), at, "{n} {at}");
                b.truncate(at + 1);
                assert_eq!(same_prefix_len(&b, &a), at, "{n} {at}");
            }
        }
    }
}
