//! Series selectors: `name{a="b",c!="d",e=~"re",f!~"re"}`, as in PromQL and `/federate?match[]=`.
//!
//! Semantics follow Prometheus: a missing label matches as the empty string, and regular expressions
//! are fully anchored.

use crate::model::LabelPair;
use std::fmt;
use std::str::FromStr;

/// How a matcher compares a label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchOp {
    /// `=`
    Equal,
    /// `!=`
    NotEqual,
    /// `=~`
    RegexMatch,
    /// `!~`
    RegexNoMatch,
}

/// One label matcher.
#[derive(Clone, Debug)]
pub struct Matcher {
    /// The label name (`__name__` for the metric name).
    pub name: String,
    /// The comparison.
    pub op: MatchOp,
    /// The value or the regular expression, unescaped.
    pub value: String,
    regex: Option<regex::Regex>,
}

/// A series selector: matchers that must all match.
#[derive(Clone, Debug)]
pub struct Selector {
    /// The matchers; a leading metric name becomes a `__name__` equality matcher.
    pub matchers: Vec<Matcher>,
    /// The text the selector was parsed from, kept to send on as `match[]`.
    pub source: String,
}

/// Why a selector could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError {
    /// The selector text.
    pub selector: String,
    /// What was wrong.
    pub reason: String,
}

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The selector may come from the network: quote it (escaping newlines) and keep it short.
        let shown: String = self.selector.chars().take(SHOWN_CHARS).collect();
        let more = if shown.len() < self.selector.len() {
            "..."
        } else {
            ""
        };
        write!(f, "invalid selector {shown:?}{more}: {}", self.reason)
    }
}

impl std::error::Error for SelectorError {}

/// How much of a bad selector an error message repeats.
const SHOWN_CHARS: usize = 200;

/// The label that holds the metric name.
pub const METRIC_NAME_LABEL: &str = "__name__";

impl MatchOp {
    /// The operator as written in a selector.
    pub fn as_str(self) -> &'static str {
        match self {
            MatchOp::Equal => "=",
            MatchOp::NotEqual => "!=",
            MatchOp::RegexMatch => "=~",
            MatchOp::RegexNoMatch => "!~",
        }
    }
}

impl fmt::Display for MatchOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Matcher {
    /// A matcher; fails when `op` is a regex one and `value` is not a valid regular expression.
    pub fn new(name: &str, op: MatchOp, value: &str) -> Result<Matcher, SelectorError> {
        let regex = match op {
            MatchOp::Equal | MatchOp::NotEqual => None,
            MatchOp::RegexMatch | MatchOp::RegexNoMatch => {
                let invalid = |e: regex::Error| SelectorError {
                    selector: format!("{name}{op}{value:?}"),
                    reason: format!(
                        "invalid regular expression: {}",
                        regex_reason(&e.to_string())
                    ),
                };
                // The value must be a regex on its own: otherwise `a)|(b` would close our group
                // and escape the anchors below.
                regex::Regex::new(value).map_err(invalid)?;
                // Anchored on both ends, as Prometheus does: `job=~"node"` must not match "nodes".
                let anchored = format!("^(?:{value})$");
                Some(regex::Regex::new(&anchored).map_err(invalid)?)
            }
        };
        Ok(Matcher {
            name: name.to_string(),
            op,
            value: value.to_string(),
            regex,
        })
    }

    /// Whether a label value (`None` when the series lacks the label) satisfies this matcher.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let value = value.unwrap_or("");
        match (self.op, &self.regex) {
            (MatchOp::Equal, _) => value == self.value,
            (MatchOp::NotEqual, _) => value != self.value,
            (MatchOp::RegexMatch, Some(re)) => re.is_match(value),
            (MatchOp::RegexNoMatch, Some(re)) => !re.is_match(value),
            // `new` always compiles the regex of a regex operator; a matcher built otherwise
            // selects nothing rather than everything.
            (MatchOp::RegexMatch | MatchOp::RegexNoMatch, None) => false,
        }
    }
}

/// The regex crate's errors span several lines (a caret diagram); an error reply is one line.
fn regex_reason(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // The last line says what is wrong ("error: unclosed group"); the first is "regex parse error:".
    lines
        .last()
        .copied()
        .unwrap_or(text)
        .trim_start_matches("error: ")
        .to_string()
}

impl Selector {
    /// Parses a selector. Like Prometheus, it refuses a selector whose matchers all match the empty
    /// string (it would select every series).
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let source = text.trim();
        let fail = |reason: String| SelectorError {
            selector: source.to_string(),
            reason,
        };
        let matchers = Parser::new(source).selector().map_err(fail)?;
        if matchers.iter().all(|m| m.matches(Some(""))) {
            return Err(fail(
                "vector selector must contain at least one non-empty matcher".to_string(),
            ));
        }
        Ok(Selector {
            matchers,
            source: source.to_string(),
        })
    }

    /// Whether the series `metric_name{labels}` is selected.
    pub fn matches(&self, metric_name: &str, labels: &[LabelPair]) -> bool {
        self.matchers.iter().all(|m| {
            let value = if m.name == METRIC_NAME_LABEL {
                Some(metric_name)
            } else {
                labels
                    .iter()
                    .find(|l| l.name.as_deref() == Some(m.name.as_str()))
                    .and_then(|l| l.value.as_deref())
            };
            m.matches(value)
        })
    }
}

/// A recursive-descent parser over one selector's characters. Errors are plain reasons; the caller
/// attaches the selector text.
struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn new(text: &str) -> Parser {
        Parser {
            chars: text.chars().collect(),
            pos: 0,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek2(&self) -> Option<char> {
        self.chars.get(self.pos + 1).copied()
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// "'x' at column 7" or "end of selector", for error messages.
    fn here(&self) -> String {
        match self.peek() {
            Some(c) => format!("{c:?} at column {}", self.pos + 1),
            None => "end of selector".to_string(),
        }
    }

    fn identifier(&mut self, allow_colon: bool) -> String {
        let start = self.pos;
        while let Some(c) = self.peek() {
            let ok = c.is_ascii_alphabetic()
                || c == '_'
                || (allow_colon && c == ':')
                || (self.pos > start && c.is_ascii_digit());
            if !ok {
                break;
            }
            self.pos += 1;
        }
        self.chars
            .get(start..self.pos)
            .unwrap_or_default()
            .iter()
            .collect()
    }

    fn selector(&mut self) -> Result<Vec<Matcher>, String> {
        self.skip_whitespace();
        if self.peek().is_none() {
            return Err("empty selector".to_string());
        }
        let metric_name = self.identifier(true);
        self.skip_whitespace();
        let mut matchers = Vec::new();
        if !metric_name.is_empty() {
            matchers.push(
                Matcher::new(METRIC_NAME_LABEL, MatchOp::Equal, &metric_name)
                    .map_err(|e| e.reason)?,
            );
        }
        match self.peek() {
            Some('{') => {
                self.pos += 1;
                let inner = self.matchers()?;
                if !metric_name.is_empty() && inner.iter().any(|m| m.name == METRIC_NAME_LABEL) {
                    return Err(format!(
                        "metric name {metric_name:?} set twice (also by a {METRIC_NAME_LABEL} matcher)"
                    ));
                }
                matchers.extend(inner);
            }
            None if !metric_name.is_empty() => {}
            _ if metric_name.is_empty() => {
                return Err(format!(
                    "unexpected {}, expected a metric name or '{{'",
                    self.here()
                ));
            }
            _ => return Err(format!("unexpected {} after the metric name", self.here())),
        }
        self.skip_whitespace();
        if self.peek().is_some() {
            return Err(format!("unexpected {} after the selector", self.here()));
        }
        Ok(matchers)
    }

    /// The matchers after `{`, up to and including `}`.
    fn matchers(&mut self) -> Result<Vec<Matcher>, String> {
        let mut matchers = Vec::new();
        loop {
            self.skip_whitespace();
            if self.peek() == Some('}') {
                self.pos += 1;
                return Ok(matchers);
            }
            matchers.push(self.matcher()?);
            self.skip_whitespace();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {}
                _ => return Err(format!("unexpected {}, expected ',' or '}}'", self.here())),
            }
        }
    }

    fn matcher(&mut self) -> Result<Matcher, String> {
        let name = self.identifier(false);
        if name.is_empty() {
            return Err(format!("unexpected {}, expected a label name", self.here()));
        }
        self.skip_whitespace();
        let op = match (self.peek(), self.peek2()) {
            (Some('='), Some('~')) => MatchOp::RegexMatch,
            (Some('!'), Some('~')) => MatchOp::RegexNoMatch,
            (Some('!'), Some('=')) => MatchOp::NotEqual,
            (Some('='), _) => MatchOp::Equal,
            _ => {
                return Err(format!(
                    "unexpected {} after label name {name:?}, expected =, !=, =~ or !~",
                    self.here()
                ))
            }
        };
        self.pos += op.as_str().len();
        self.skip_whitespace();
        let value = self
            .string()
            .map_err(|reason| format!("label {name:?}: {reason}"))?;
        Matcher::new(&name, op, &value).map_err(|e| format!("label {name:?}: {}", e.reason))
    }

    /// A quoted string: "..." or '...' with Go escapes, or `...` raw.
    fn string(&mut self) -> Result<String, String> {
        let quote = match self.peek() {
            Some(q @ ('"' | '\'' | '`')) => q,
            _ => {
                return Err(format!(
                    "unexpected {}, expected a quoted value",
                    self.here()
                ))
            }
        };
        let start = self.pos + 1;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(format!(
                    "string starting at column {start} is not terminated"
                ));
            };
            self.pos += 1;
            match c {
                _ if c == quote => return Ok(out),
                '\\' if quote != '`' => out.push(self.escape()?),
                '\n' if quote != '`' => {
                    return Err(format!("newline in string starting at column {start}"))
                }
                _ => out.push(c),
            }
        }
    }

    /// The character an escape stands for; the backslash is consumed.
    fn escape(&mut self) -> Result<char, String> {
        let at = self.pos;
        let Some(c) = self.peek() else {
            return Err("string ends inside an escape".to_string());
        };
        self.pos += 1;
        let simple = match c {
            'a' => Some('\u{07}'),
            'b' => Some('\u{08}'),
            'f' => Some('\u{0c}'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            'v' => Some('\u{0b}'),
            '\\' | '"' | '\'' => Some(c),
            _ => None,
        };
        if let Some(simple) = simple {
            return Ok(simple);
        }
        let digits = match c {
            'u' => 4,
            'U' => 8,
            _ => return Err(format!("unknown escape \\{c} at column {at}")),
        };
        let hex: String = self
            .chars
            .get(self.pos..self.pos + digits)
            .unwrap_or_default()
            .iter()
            .collect();
        let code = (hex.chars().count() == digits && hex.chars().all(|h| h.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(&hex, 16).ok())
            .flatten()
            .and_then(char::from_u32)
            .ok_or_else(|| format!("invalid unicode escape \\{c}{hex} at column {at}"))?;
        self.pos += digits;
        Ok(code)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Parses a selector file: one selector per line; blank lines and lines starting with `#` are skipped.
pub fn parse_file(contents: &str) -> Result<Vec<Selector>, SelectorError> {
    let mut selectors = Vec::new();
    for (index, line) in contents.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let selector = Selector::parse(line).map_err(|e| SelectorError {
            selector: e.selector,
            reason: format!("line {}: {}", index + 1, e.reason),
        })?;
        selectors.push(selector);
    }
    Ok(selectors)
}

/// Whether any of `selectors` selects the series.
pub fn any_matches(selectors: &[Selector], metric_name: &str, labels: &[LabelPair]) -> bool {
    selectors.iter().any(|s| s.matches(metric_name, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str, value: &str) -> LabelPair {
        LabelPair {
            name: Some(name.to_string()),
            value: Some(value.to_string()),
        }
    }

    /// The matchers of a parsed selector as (name, op, value) triples.
    fn parsed(text: &str) -> Vec<(String, MatchOp, String)> {
        Selector::parse(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .matchers
            .into_iter()
            .map(|m| (m.name, m.op, m.value))
            .collect()
    }

    fn m(name: &str, op: MatchOp, value: &str) -> (String, MatchOp, String) {
        (name.to_string(), op, value.to_string())
    }

    fn reason(text: &str) -> String {
        match Selector::parse(text) {
            Ok(s) => panic!("{text:?} parsed as {:?}", s.matchers),
            Err(e) => e.reason,
        }
    }

    use MatchOp::*;

    #[test]
    fn metric_name_alone() {
        assert_eq!(parsed("up"), vec![m("__name__", Equal, "up")]);
        assert_eq!(
            parsed("job:http_requests:rate5m"),
            vec![m("__name__", Equal, "job:http_requests:rate5m")]
        );
        assert_eq!(parsed("  up \t"), vec![m("__name__", Equal, "up")]);
        assert_eq!(parsed("up{}"), vec![m("__name__", Equal, "up")]);
    }

    #[test]
    fn name_and_matchers() {
        assert_eq!(
            parsed(r#"up{job="node",instance!="a:1",env=~"prod|stage",team!~"x.*"}"#),
            vec![
                m("__name__", Equal, "up"),
                m("job", Equal, "node"),
                m("instance", NotEqual, "a:1"),
                m("env", RegexMatch, "prod|stage"),
                m("team", RegexNoMatch, "x.*"),
            ]
        );
    }

    #[test]
    fn braces_only_and_name_matcher() {
        assert_eq!(
            parsed(r#"{__name__="up"}"#),
            vec![m("__name__", Equal, "up")]
        );
        assert_eq!(
            parsed(r#"{__name__=~"node_.*", job="x"}"#),
            vec![m("__name__", RegexMatch, "node_.*"), m("job", Equal, "x")]
        );
    }

    #[test]
    fn whitespace_and_trailing_comma() {
        let want = vec![
            m("__name__", Equal, "up"),
            m("a", Equal, "b"),
            m("c", RegexMatch, "d"),
        ];
        for text in [
            r#"up{a="b",c=~"d"}"#,
            r#"up { a = "b" , c =~ "d" , }"#,
            "up\t{\n a=\"b\",\n c=~\"d\",\n}\n",
            r#"up{a="b",c=~"d",}"#,
        ] {
            assert_eq!(parsed(text), want, "{text:?}");
        }
    }

    #[test]
    fn quote_styles_and_escapes() {
        let value = |text: &str| parsed(text).pop().unwrap().2;
        assert_eq!(value(r#"{a="x"}"#), "x");
        assert_eq!(value(r#"{a='x'}"#), "x");
        assert_eq!(value("{a=`x`}"), "x");
        assert_eq!(value(r#"{a="q\"q"}"#), "q\"q");
        assert_eq!(value(r#"{a='q\'q'}"#), "q'q");
        assert_eq!(value(r#"{a='q"q'}"#), "q\"q");
        assert_eq!(value(r#"{a="q'q"}"#), "q'q");
        assert_eq!(value(r#"{a="b\\s"}"#), "b\\s");
        assert_eq!(value(r#"{a="1\n2\t3\r"}"#), "1\n2\t3\r");
        assert_eq!(value(r#"{a="\u00e9\U0001F600"}"#), "é😀");
        assert_eq!(value(r#"{a="é,}"}"#), "é,}");
        // Backticks are raw: no escapes, newlines allowed.
        assert_eq!(value(r"{a=`\d+\n`}"), r"\d+\n");
        assert_eq!(value("{a=`1\n2`}"), "1\n2");
        // An escaped regex reaches the regex engine unescaped once, as in PromQL.
        let s = Selector::parse(r#"{a=~"\\d+"}"#).unwrap();
        assert_eq!(s.matchers[0].value, r"\d+");
        assert!(s.matches("x", &[pair("a", "123")]));
        assert!(!s.matches("x", &[pair("a", "12a")]));
    }

    #[test]
    fn empty_and_bad_syntax() {
        assert_eq!(reason(""), "empty selector");
        assert_eq!(reason("   "), "empty selector");
        assert_eq!(
            reason("up{"),
            "unexpected end of selector, expected a label name"
        );
        assert_eq!(
            reason(r#"up{job="x""#),
            "unexpected end of selector, expected ',' or '}'"
        );
        assert_eq!(
            reason(r#"up{job}"#),
            "unexpected '}' at column 7 after label name \"job\", expected =, !=, =~ or !~"
        );
        assert_eq!(
            reason(r#"up{job==x}"#),
            "label \"job\": unexpected '=' at column 8, expected a quoted value"
        );
        assert_eq!(
            reason(r#"up{job=node}"#),
            "label \"job\": unexpected 'n' at column 8, expected a quoted value"
        );
        assert_eq!(
            reason(r#"up{job="node}"#),
            "label \"job\": string starting at column 8 is not terminated"
        );
        assert_eq!(
            reason(r#"up{1job="x"}"#),
            "unexpected '1' at column 4, expected a label name"
        );
        assert_eq!(
            reason(r#"up{a:b="x"}"#),
            "unexpected ':' at column 5 after label name \"a\", expected =, !=, =~ or !~"
        );
        assert_eq!(
            reason(r#"up{a="x" b="y"}"#),
            "unexpected 'b' at column 10, expected ',' or '}'"
        );
        assert_eq!(
            reason(r#"up{a="x",,}"#),
            "unexpected ',' at column 10, expected a label name"
        );
        assert_eq!(
            reason(r#"up{a="x"} extra"#),
            "unexpected 'e' at column 11 after the selector"
        );
        assert_eq!(
            reason("up[5m]"),
            "unexpected '[' at column 3 after the metric name"
        );
        assert_eq!(
            reason("1up"),
            "unexpected '1' at column 1, expected a metric name or '{'"
        );
        assert_eq!(
            reason("up foo"),
            "unexpected 'f' at column 4 after the metric name"
        );
        assert_eq!(
            reason(r#"up{a="x\q"}"#),
            "label \"a\": unknown escape \\q at column 8"
        );
        assert_eq!(
            reason(r#"up{a="\u12"}"#),
            "label \"a\": invalid unicode escape \\u12\"} at column 7"
        );
        assert_eq!(
            reason(r#"up{a="\uD800"}"#),
            "label \"a\": invalid unicode escape \\uD800 at column 7"
        );
        assert_eq!(
            reason("up{a=\"x\ny\"}"),
            "label \"a\": newline in string starting at column 6"
        );
    }

    #[test]
    fn metric_name_set_twice() {
        assert_eq!(
            reason(r#"up{__name__="down"}"#),
            "metric name \"up\" set twice (also by a __name__ matcher)"
        );
    }

    #[test]
    fn invalid_regex() {
        let r = reason(r#"up{a=~"(x"}"#);
        assert!(
            r.starts_with("label \"a\": invalid regular expression: "),
            "{r}"
        );
        assert!(!r.contains('\n'), "{r}");
        let err = Matcher::new("a", RegexMatch, "[").unwrap_err();
        assert!(
            err.reason.starts_with("invalid regular expression"),
            "{err}"
        );
        // A value that would break out of the anchoring group is refused, not unanchored.
        assert!(Matcher::new("a", RegexMatch, "a)|(b").is_err());
        assert!(Matcher::new("a", RegexMatch, "a)|.*|(b").is_err());
        // Equality matchers take any text, regex syntax or not.
        assert!(Matcher::new("a", Equal, "[").is_ok());
    }

    #[test]
    fn refuses_selectors_matching_everything() {
        for text in [
            "{}",
            r#"{a=""}"#,
            r#"{a=~".*"}"#,
            r#"{a=~""}"#,
            r#"{a!="x"}"#,
            r#"{a!~"x"}"#,
            r#"{a="", b=~"x|"}"#,
        ] {
            assert_eq!(
                reason(text),
                "vector selector must contain at least one non-empty matcher",
                "{text}"
            );
        }
        for text in [
            r#"{a!=""}"#,
            r#"{a=~".+"}"#,
            r#"{a="", b="x"}"#,
            r#"{a!~""}"#,
            "up",
        ] {
            assert!(Selector::parse(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn matching_semantics() {
        let labels = [pair("job", "node"), pair("env", "prod")];
        let yes = |text: &str| Selector::parse(text).unwrap().matches("up", &labels);
        assert!(yes("up"));
        assert!(!yes("down"));
        assert!(yes(r#"up{job="node"}"#));
        assert!(!yes(r#"up{job="nod"}"#));
        assert!(yes(r#"{__name__="up",env!="dev"}"#));
        assert!(yes(r#"{__name__=~"u."}"#));
        // Anchored: a regex must match the whole value.
        assert!(!yes(r#"{job=~"nod"}"#));
        assert!(!yes(r#"{job=~"ode"}"#));
        assert!(yes(r#"{job=~"nod.|x"}"#));
        assert!(!yes(r#"{job=~"x|nod"}"#));
        assert!(yes(r#"up{job!~"nod"}"#));
        assert!(!yes(r#"up{job!~"no.*"}"#));
        // A missing label is the empty string.
        assert!(yes(r#"up{team=""}"#));
        assert!(yes(r#"up{team=~"|a"}"#));
        assert!(yes(r#"up{team!="x"}"#));
        assert!(!yes(r#"up{team="x"}"#));
        assert!(!yes(r#"up{team!=""}"#));
        assert!(!yes(r#"up{team=~".+"}"#));
        // A label present with an empty value is the same as missing.
        let with_empty = [pair("team", "")];
        let s = Selector::parse(r#"up{team!=""}"#).unwrap();
        assert!(!s.matches("up", &with_empty));
        let no_value = [LabelPair {
            name: Some("team".to_string()),
            value: None,
        }];
        assert!(!s.matches("up", &no_value));
    }

    #[test]
    fn matcher_direct() {
        let eq = Matcher::new("a", Equal, "x").unwrap();
        assert!(eq.matches(Some("x")));
        assert!(!eq.matches(None));
        let ne = Matcher::new("a", NotEqual, "").unwrap();
        assert!(ne.matches(Some("x")));
        assert!(!ne.matches(None));
        let re = Matcher::new("a", RegexMatch, "a|b").unwrap();
        assert!(re.matches(Some("b")));
        assert!(!re.matches(Some("ab")));
        assert!(!re.matches(None));
        let nre = Matcher::new("a", RegexNoMatch, "a|b").unwrap();
        assert!(nre.matches(None));
        assert!(!nre.matches(Some("a")));
    }

    #[test]
    fn any_matches_is_or() {
        let selectors = vec![
            Selector::parse("up").unwrap(),
            Selector::parse(r#"{job="x"}"#).unwrap(),
        ];
        assert!(any_matches(&selectors, "up", &[]));
        assert!(any_matches(&selectors, "other", &[pair("job", "x")]));
        assert!(!any_matches(&selectors, "other", &[pair("job", "y")]));
        assert!(!any_matches(&[], "up", &[]));
    }

    #[test]
    fn source_is_kept_and_displayed() {
        let s: Selector = r#"  up{job="node"} "#.parse().unwrap();
        assert_eq!(s.source, r#"up{job="node"}"#);
        assert_eq!(s.to_string(), r#"up{job="node"}"#);
    }

    #[test]
    fn file_of_selectors() {
        let file =
            "# whitelist\n\nup\n  # indented comment\n{__name__=~\"node_.*\", job=\"x\"}\r\n\t\n";
        let selectors = parse_file(file).unwrap();
        let sources: Vec<&str> = selectors.iter().map(|s| s.source.as_str()).collect();
        assert_eq!(sources, ["up", r#"{__name__=~"node_.*", job="x"}"#]);
        assert!(parse_file("").unwrap().is_empty());
        assert!(parse_file("# only\n\n").unwrap().is_empty());
    }

    #[test]
    fn file_error_names_the_line() {
        let err = parse_file("up\n# c\n\nup{job=}\n").unwrap_err();
        assert_eq!(err.selector, "up{job=}");
        assert_eq!(
            err.reason,
            "line 4: label \"job\": unexpected '}' at column 8, expected a quoted value"
        );
        assert_eq!(
            err.to_string(),
            "invalid selector \"up{job=}\": line 4: label \"job\": unexpected '}' at column 8, expected a quoted value"
        );
    }

    #[test]
    fn display_is_one_short_line() {
        let long = format!("up{{a=\"{}\n", "x".repeat(10_000));
        let err = Selector::parse(&long).unwrap_err();
        let line = err.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.len() < 400, "{} bytes", line.len());
    }
}
