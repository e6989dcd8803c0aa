//! The Prometheus text exposition format, version 0.0.4: parser and encoder.
//!
//! The parser groups `_bucket`/`_sum`/`_count` and quantile lines into histogram and summary
//! series the way the Go `expfmt` parser does, so a text body and the protobuf body of the same
//! metrics decode to the same families.

mod float;
mod parse;
mod series;
mod skip;
mod write;

pub use float::format_float;
pub use parse::{parse, Limits, ParseError};
pub use series::usual_family;
pub use skip::{reserved_label, type_label, unservable_labels, SkipReason, Skipped};
pub use write::{
    encode, write_family, write_family_counted, write_family_view, write_family_view_part,
    write_family_view_part_plain,
};

#[cfg(test)]
mod tests;
