//! The series of a family as the text writer reads them: exactly [`FamilyView::metrics`]'s
//! items, with the shape nearly every series has read in one short pass of its bytes.
//!
//! `/federate` reads every series of every cluster: the general reading (each series' fields
//! through the one field reader, the timestamp through its long varint path, the value's
//! kind matched to the family's) was a tenth of a scrape. A series of short labels, then one
//! gauge, counter or untyped value as every encoder writes it, then a timestamp or nothing, is
//! read here into the very view the general reading makes of it; any other series is read
//! the general way, and a family whose fields are not its header then its series, each framed
//! the usual way, is read the general way throughout. So the items, errors included, are the
//! same (tests compare both readings on mutated families).

use crate::delimited::DecodeError;
use crate::wire::{series_field, short_varint, FamilyView, MetricView, Metrics, Value};

/// The series of `family`, as [`FamilyView::metrics`] reads them.
pub(super) fn series<'a>(family: &FamilyView<'a>) -> Series<'a> {
    match series_fields(family.message) {
        Some(rest) => Series::Usual {
            family: *family,
            rest,
            done: false,
        },
        None => Series::General(family.metrics()),
    }
}

/// An iterator over a family's series (see [`series`]). After an error it ends.
pub(super) enum Series<'a> {
    /// A family framed the usual way: `rest` is its series' fields still to read.
    Usual {
        family: FamilyView<'a>,
        rest: &'a [u8],
        done: bool,
    },
    /// Any other family.
    General(Metrics<'a>),
}

impl<'a> Iterator for Series<'a> {
    type Item = Result<MetricView<'a>, DecodeError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let (family, rest, done) = match self {
            Series::General(metrics) => return metrics.next(),
            Series::Usual { family, rest, done } => (family, rest, done),
        };
        if *done || rest.is_empty() {
            return None;
        }
        let field = *rest;
        // Every field was framed by `series_fields`; should one not be, the general reading
        // below reports it.
        if let Some((message, after)) = series_field(field) {
            *rest = after;
            if let Some(view) = usual_series(message) {
                return Some(Ok(view));
            }
        }
        // The general reading of the family from this series on reads this series first.
        let from_here = FamilyView {
            message: field,
            ..*family
        };
        let item = from_here.metrics().next();
        *done = !matches!(item, Some(Ok(_)));
        item
    }
}

/// The family of `message` (a `MetricFamily` without its prefix) as [`FamilyView::parse`] reads
/// it, when it is framed the usual way (its name, help and type, each once and in that order,
/// then nothing but series framed as [`series`] reads them in one pass): the view is then its
/// first few fields, and the general field reader's walk of every series (a few percent of a
/// `/federate` scrape, which parses every family of every cluster) is left out. `None` for any
/// other family, or a name or help that is not UTF-8: [`FamilyView::parse`] reads it, and says
/// what is wrong.
pub fn usual_family(message: &[u8]) -> Option<FamilyView<'_>> {
    let UsualFamily {
        name,
        help,
        raw_type,
        ..
    } = usual_parts(message)?;
    Some(FamilyView {
        name: std::str::from_utf8(name).ok()?,
        help: std::str::from_utf8(help).ok()?,
        raw_type,
        message,
    })
}

/// Where a family's series' fields start, when it is framed the usual way ([`usual_parts`]);
/// `None` for any other family.
fn series_fields(message: &[u8]) -> Option<&[u8]> {
    usual_parts(message).map(|family| family.series)
}

/// A family framed the usual way, in parts.
struct UsualFamily<'a> {
    name: &'a [u8],
    help: &'a [u8],
    /// Its type as the wire has it (the low 32 bits of the varint, as an int32 enum).
    raw_type: Option<i32>,
    /// Its series' fields.
    series: &'a [u8],
}

/// The parts of `message` when it is its header's fields (name, help, type, each once and in
/// that order, any of them absent) followed by nothing but series fields, each with a one-byte
/// key and a length of one or two bytes (as the general reading's quick path reads them); `None`
/// for any other family.
fn usual_parts(message: &[u8]) -> Option<UsualFamily<'_>> {
    let mut rest = message;
    // Name and help: a length-delimited field each.
    let mut fields: [&[u8]; 2] = [&[], &[]];
    for (key, field) in [NAME_KEY, HELP_KEY].into_iter().zip(&mut fields) {
        if let [k, ref tail @ ..] = *rest {
            if k == key {
                let (len, tail) = short_varint(tail)?;
                let (bytes, after) = tail.split_at_checked(usize::try_from(len).ok()?)?;
                *field = bytes;
                rest = after;
            }
        }
    }
    let mut raw_type = None;
    if let [TYPE_KEY, ref tail @ ..] = *rest {
        let (value, tail) = short_varint(tail)?;
        raw_type = Some(value as i32);
        rest = tail;
    }
    let mut check = rest;
    while !check.is_empty() {
        let (_, after) = series_field(check)?;
        check = after;
    }
    let [name, help] = fields;
    Some(UsualFamily {
        name,
        help,
        raw_type,
        series: rest,
    })
}

/// The view of a series written the usual way: short labels (each `0a <len under 128>`, read
/// later), one gauge, counter or untyped value (`<key> 09 09 <8 bytes>`), then a timestamp
/// (`30 <varint of at most 9 bytes>`) or nothing. `None` for anything else.
#[inline(always)]
fn usual_series(message: &[u8]) -> Option<MetricView<'_>> {
    let mut rest = message;
    while let [LABEL_KEY, len, ref tail @ ..] = *rest {
        if len >= 0x80 {
            return None;
        }
        rest = tail.get(usize::from(len)..)?;
    }
    let labels = &message[..message.len() - rest.len()];
    let [key, 9, VALUE_KEY, b0, b1, b2, b3, b4, b5, b6, b7, ref tail @ ..] = *rest else {
        return None;
    };
    let v = f64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]);
    let value = match key {
        GAUGE_KEY => Value::Gauge(v),
        COUNTER_KEY => Value::Counter(v),
        UNTYPED_KEY => Value::Untyped(v),
        _ => return None,
    };
    let timestamp_ms = match *tail {
        [] => None,
        [TIMESTAMP_KEY, ref varint @ ..] => match short_varint(varint)? {
            (ts, []) => Some(ts as i64),
            _ => return None,
        },
        _ => return None,
    };
    Some(MetricView {
        message,
        timestamp_ms,
        value,
        labels,
    })
}

// The one-byte keys of metrics.proto's fields read here: (field << 3) | wire type.
const NAME_KEY: u8 = (1 << 3) | 2;
const HELP_KEY: u8 = (2 << 3) | 2;
const TYPE_KEY: u8 = 3 << 3;
const LABEL_KEY: u8 = (1 << 3) | 2;
const GAUGE_KEY: u8 = (2 << 3) | 2;
const COUNTER_KEY: u8 = (3 << 3) | 2;
const UNTYPED_KEY: u8 = (5 << 3) | 2;
/// A gauge's, counter's or untyped value's field 1, a double.
const VALUE_KEY: u8 = (1 << 3) | 1;
const TIMESTAMP_KEY: u8 = 6 << 3;

#[cfg(test)]
mod tests {
    use super::{series, usual_family};
    use crate::delimited;
    use crate::wire::FamilyView;

    /// Both readings of `message` (a family without its prefix), item by item.
    fn both(message: &[u8]) -> Option<(Vec<String>, Vec<String>)> {
        let family = FamilyView::parse(message).ok()?;
        let general: Vec<String> = family.metrics().map(|m| format!("{m:?}")).collect();
        let usual: Vec<String> = series(&family).map(|m| format!("{m:?}")).collect();
        Some((general, usual))
    }

    #[test]
    fn the_usual_reading_reads_what_the_general_reading_reads() {
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        for i in 0..3 {
            let cluster = format!("c{i}");
            // The bench's realistic upload (testkit's own build of this crate made it, so it
            // comes across as bytes).
            let upload = testkit::payload::upload_body(&cluster, 1_700_000_000_000 + i);
            bodies.push(crate::snappy::decode_framed(&upload, 1 << 24).unwrap());
        }
        let limits = delimited::Limits::default();
        let mut messages: Vec<Vec<u8>> = Vec::new();
        for body in &bodies {
            for family in crate::wire::families(body, &limits) {
                messages.push(family.unwrap().message.to_vec());
            }
        }
        let mut rng = testkit::fuzz::Rng::new(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: usize| rng.below(n);
        let mut compared = 0;
        let mut usual_read = 0;
        for round in 0..20_000 {
            let mut message = messages[round % messages.len()].clone();
            // Unchanged, then one to three bytes changed (to anything, or to a key or length
            // byte the usual reading looks for), or cut short.
            if round >= messages.len() {
                let keys = [0x0a, 0x12, 0x18, 0x1a, 0x22, 0x2a, 0x30, 0x09];
                mutate(&mut message, &mut next, 3, usize::MAX, keys);
            }
            let Some((general, usual)) = both(&message) else {
                continue;
            };
            assert_eq!(general, usual, "{message:02x?}");
            compared += 1;
            let family = FamilyView::parse(&message).unwrap();
            usual_read += usize::from(matches!(series(&family), super::Series::Usual { .. }));
        }
        // Both ways were taken, often.
        assert!(compared > 10_000, "{compared}");
        assert!(usual_read > 5_000, "{usual_read}");
    }

    /// Changes one to `changes` bytes among the first `reach` of `message` (to anything, to one
    /// of `keys`, the key and length bytes a quick reader looks for, or by a flipped top bit or
    /// one more), and one time in five cuts it short.
    fn mutate(
        message: &mut Vec<u8>,
        next: &mut impl FnMut(usize) -> usize,
        changes: usize,
        reach: usize,
        keys: [u8; 8],
    ) {
        for _ in 0..1 + next(changes) {
            let at = next(message.len().min(reach));
            let Some(byte) = message.get(at).copied() else {
                break;
            };
            message[at] = match next(4) {
                0 => next(256) as u8,
                1 => keys[next(8)],
                2 => byte ^ 0x80,
                _ => byte.wrapping_add(1),
            };
        }
        if next(5) == 0 {
            message.truncate(next(message.len()));
        }
    }

    #[test]
    fn a_usual_family_is_read_as_the_general_reader_reads_it() {
        let upload = testkit::payload::upload_body("c", 1_700_000_000_000);
        let body = crate::snappy::decode_framed(&upload, 1 << 24).unwrap();
        let messages: Vec<Vec<u8>> = crate::wire::families(&body, &delimited::Limits::default())
            .map(|family| family.unwrap().message.to_vec())
            .collect();
        let same = |a: &FamilyView<'_>, b: &FamilyView<'_>| {
            (a.name, a.help, a.raw_type, a.message) == (b.name, b.help, b.raw_type, b.message)
        };
        // Every family of the bench's upload is read the quick way, to the same view.
        for message in &messages {
            let usual = usual_family(message).expect("the bench's families are usual");
            assert!(same(&usual, &FamilyView::parse(message).unwrap()));
        }
        // Mutated, a family read the quick way is read the same way by the general reader (a
        // message that reader refuses, or reads otherwise, is never read the quick way).
        let mut rng = testkit::fuzz::Rng::new(0x2545_f491_4f6c_dd1d);
        let mut next = |n: usize| rng.below(n);
        let mut quick = 0;
        for round in 0..20_000 {
            let mut message = messages[round % messages.len()].clone();
            let keys = [0x0a, 0x12, 0x18, 0x1a, 0x22, 0x2a, 0x80, 0xff];
            mutate(&mut message, &mut next, 2, 80, keys);
            if let Some(usual) = usual_family(&message) {
                quick += 1;
                let general = FamilyView::parse(&message).expect("read the quick way");
                assert!(same(&usual, &general), "{message:02x?}");
            }
        }
        assert!(quick > 2_000, "{quick}");
        // A help after the series, a name twice, a name that is not UTF-8: the general way.
        let series = [0x22, 0x02, 0x0a, 0x00];
        for message in [
            [
                &[0x0a, 0x01, b'f', 0x18, 0x01][..],
                &series,
                &[0x12, 0x01, b'h'],
            ]
            .concat(),
            [&[0x0a, 0x01, b'f', 0x0a, 0x01, b'g'][..], &series].concat(),
            [&[0x0a, 0x01, 0xff][..], &series].concat(),
        ] {
            assert!(usual_family(&message).is_none(), "{message:02x?}");
        }
    }

    #[test]
    fn timestamps_too_long_and_values_written_otherwise_are_read_the_general_way() {
        // A series `0a 06 <label a=1>`, then its value or timestamp written in other ways.
        let label = [0x0a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'1'];
        let value = [0x12, 0x09, 0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f];
        let cases: Vec<Vec<u8>> = vec![
            // A negative timestamp: ten bytes.
            [&value[..], &[0x30], &[0xff; 9], &[0x01]].concat(),
            // The timestamp first.
            [&[0x30, 0x05][..], &value].concat(),
            // Two values.
            [&value[..], &value].concat(),
            // A value without its double.
            vec![0x12, 0x00],
            // A counter, the usual way, and a timestamp.
            [&[0x1a, 0x09, 0x09][..], &[0; 8], &[0x30, 0x05]].concat(),
        ];
        for tail in cases {
            let series = [&label[..], &tail].concat();
            let mut message = vec![0x0a, 0x01, b'f', 0x18, 0x01, 0x22, series.len() as u8];
            message.extend_from_slice(&series);
            let (general, usual) = both(&message).unwrap();
            assert_eq!(general, usual, "{message:02x?}");
        }
    }
}
