//! [`ShortText`]: a request's method or path, held in place when short (as nearly all are), so
//! reading a request head does not allocate for them (two allocations of an upload's ~11).

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// The most bytes held in place; longer text is a `String`. 30 keeps the value 32 bytes wide
/// and holds every method and the paths this server answers on.
const IN_PLACE: usize = 30;

/// Text, held in place up to [`IN_PLACE`] bytes; reads as a `&str`.
#[derive(Clone)]
pub struct ShortText(Repr);

#[derive(Clone)]
enum Repr {
    InPlace { len: u8, bytes: [u8; IN_PLACE] },
    Heap(String),
}

impl ShortText {
    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Copied from a `str` whole, so always UTF-8; a failed check would only mean a bug
            // here, and reads as empty rather than panicking on a request's bytes.
            Repr::InPlace { len, bytes } => {
                std::str::from_utf8(bytes.get(..usize::from(*len)).unwrap_or_default())
                    .unwrap_or_default()
            }
            Repr::Heap(text) => text,
        }
    }
}

impl From<&str> for ShortText {
    fn from(text: &str) -> ShortText {
        match u8::try_from(text.len()) {
            Ok(len) if text.len() <= IN_PLACE => {
                let mut bytes = [0u8; IN_PLACE];
                bytes[..text.len()].copy_from_slice(text.as_bytes());
                ShortText(Repr::InPlace { len, bytes })
            }
            _ => ShortText(Repr::Heap(text.to_owned())),
        }
    }
}

impl From<String> for ShortText {
    fn from(text: String) -> ShortText {
        if text.len() <= IN_PLACE {
            ShortText::from(text.as_str())
        } else {
            ShortText(Repr::Heap(text))
        }
    }
}

impl From<ShortText> for String {
    fn from(text: ShortText) -> String {
        match text.0 {
            Repr::Heap(text) => text,
            Repr::InPlace { .. } => text.as_str().to_owned(),
        }
    }
}

impl Default for ShortText {
    fn default() -> ShortText {
        ShortText::from("")
    }
}

impl Deref for ShortText {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for ShortText {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for ShortText {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for ShortText {
    fn eq(&self, other: &ShortText) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for ShortText {}

impl Hash for ShortText {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq<str> for ShortText {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ShortText {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for ShortText {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<ShortText> for str {
    fn eq(&self, other: &ShortText) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<ShortText> for &str {
    fn eq(&self, other: &ShortText) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<ShortText> for String {
    fn eq(&self, other: &ShortText) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Display for ShortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ShortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_held_in_place_and_long_text_on_the_heap() {
        let short = ShortText::from("/upload");
        assert!(matches!(short.0, Repr::InPlace { len: 7, .. }));
        assert_eq!(short, "/upload");
        let edge = "/".repeat(IN_PLACE);
        assert!(matches!(
            ShortText::from(edge.as_str()).0,
            Repr::InPlace { .. }
        ));
        let long = format!("/{}", "a".repeat(IN_PLACE));
        let held = ShortText::from(long.as_str());
        assert!(matches!(held.0, Repr::Heap(_)));
        assert_eq!(held.as_str(), long);
        assert_eq!(String::from(held), long);
    }

    #[test]
    fn multibyte_text_reads_back_whole() {
        let text = "/é/ü/日本";
        assert_eq!(ShortText::from(text).as_str(), text);
        assert_eq!(ShortText::from(text.to_string()).to_string(), text);
        assert_eq!(format!("{:?}", ShortText::from(text)), format!("{text:?}"));
    }

    #[test]
    fn compares_as_its_text() {
        let method = ShortText::from("POST");
        assert!(method == "POST");
        assert!(method != "GET");
        assert!("POST" == method);
        assert_eq!(ShortText::default(), "");
    }
}
