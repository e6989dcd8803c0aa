//! A small coverage-less mutation fuzzer, written by hand because cargo-fuzz and libFuzzer need a
//! nightly toolchain and property-testing crates are not in the workspace.
//!
//! Each target gets a seed corpus (files under `tests/fixtures/fuzz/<target>/`, plus seeds built at
//! run time), a dictionary of tokens its format cares about, and a time budget. Every input runs
//! under `catch_unwind`; a panic or a broken property fails the test with the input escaped, the
//! seed, and a copy of the input written under cargo's `target/tmp`.
//!
//! Environment:
//! - `FUZZ_SECONDS`: the budget per target (default 3, so CI stays quick);
//! - `FUZZ_SEED`: the base seed (default: from the clock); the run is deterministic given the seed,
//!   so a failure at exec N reproduces with the same seed.
//!
//! Each crate's fuzz tests call [`run`] with their own targets; the corpus lives in the workspace's
//! `tests/fixtures/fuzz/`.

use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// Inputs never grow past this, so one exec stays cheap.
pub const MAX_INPUT: usize = 64 << 10;

/// xorshift64* seeded through splitmix64: tiny, fast, and good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence depends only on `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // xorshift must never hold zero.
        Rng(z | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// True once in `n` times on average.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// A length biased towards small values: mostly 1..8, sometimes up to `max`.
    pub fn len(&mut self, max: usize) -> usize {
        let max = max.max(1);
        if self.one_in(8) {
            1 + self.below(max)
        } else {
            1 + self.below(max.min(8))
        }
    }

    /// One element of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Bytes that break parsers: boundaries of signed and unsigned bytes, and the punctuation of the
/// text formats we parse.
const INTERESTING_BYTES: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, b'\\', b'"', b'{', b'}', b'\n', b'\r', b'\t', b' ', b'=',
    b',', b'#', b'.', b'_', b'-', b'+', b'e', b'0', b'9',
];

/// Tokens every target gets on top of its own dictionary.
const COMMON_TOKENS: &[&[u8]] = &[
    b"NaN",
    b"+Inf",
    b"-Inf",
    b"Inf",
    b"\\",
    b"\\\\",
    b"\\\"",
    b"\\n",
    b"\"",
    b"{",
    b"}",
    b"\n",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
    b"\xff\xff\xff\xff\x0f",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"18446744073709551615",
    b"18446744073709551616",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"1e308",
    b"1e309",
    b"-0",
    b"4.9e-324",
    b"\xc3\xa9",
    b"\xe2\x82\xac",
    b"\xf0\x9f\x92\xa9",
    b"\xed\xa0\x80",
    b"\xc0\x80",
];

/// Applies one to a few stacked mutations to `input`, drawing on `corpus` for splices and on
/// `dict` (plus `COMMON_TOKENS`) for insertions.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    let rounds = if rng.one_in(4) {
        1 + rng.below(16)
    } else {
        1 + rng.below(4)
    };
    for _ in 0..rounds {
        mutate_once(rng, input, corpus, dict);
    }
    input.truncate(MAX_INPUT);
}

fn mutate_once(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    let len = input.len();
    match rng.below(16) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.below(len);
            input[i] ^= 1 << rng.below(8);
        }
        // Overwrite a byte with a random one.
        1 if len > 0 => {
            let i = rng.below(len);
            input[i] = rng.next_u64() as u8;
        }
        // Overwrite a byte with an interesting one.
        2 if len > 0 => {
            let i = rng.below(len);
            input[i] = *rng.pick(INTERESTING_BYTES);
        }
        // Add or subtract a little (length prefixes, digits).
        3 if len > 0 => {
            let i = rng.below(len);
            let delta = 1 + rng.below(35) as u8;
            input[i] = if rng.one_in(2) {
                input[i].wrapping_add(delta)
            } else {
                input[i].wrapping_sub(delta)
            };
        }
        // Insert random bytes.
        4 => {
            let at = rng.below(len + 1);
            let n = rng.len(32);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            input.splice(at..at, bytes);
        }
        // Delete a range.
        5 if len > 0 => {
            let at = rng.below(len);
            let n = rng.len(len - at).min(len - at);
            input.drain(at..at + n);
        }
        // Duplicate a range, sometimes many times over.
        6 if len > 0 => {
            let at = rng.below(len);
            let n = rng.len(len - at).min(len - at);
            let piece = input[at..at + n].to_vec();
            let times = if rng.one_in(8) { 1 + rng.below(64) } else { 1 };
            let to = rng.below(len + 1);
            let copies: Vec<u8> = piece.iter().copied().cycle().take(n * times).collect();
            input.splice(to..to, copies);
        }
        // Splice: our prefix, another input's suffix.
        7 if !corpus.is_empty() => {
            let other = rng.pick(corpus);
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        // Insert a piece of another input.
        8 if !corpus.is_empty() => {
            let other = rng.pick(corpus);
            if !other.is_empty() {
                let from = rng.below(other.len());
                let n = rng.len(other.len() - from).min(other.len() - from);
                let at = rng.below(len + 1);
                input.splice(at..at, other[from..from + n].iter().copied());
            }
        }
        // Insert or overwrite with a dictionary token.
        9 | 10 => {
            let token: &[u8] = if !dict.is_empty() && rng.one_in(2) {
                rng.pick::<&[u8]>(dict)
            } else {
                rng.pick::<&[u8]>(COMMON_TOKENS)
            };
            let at = rng.below(len + 1);
            if rng.one_in(2) {
                input.splice(at..at, token.iter().copied());
            } else {
                let end = (at + token.len()).min(len);
                input.splice(at..end, token.iter().copied());
            }
        }
        // A run of one interesting byte.
        11 => {
            let at = rng.below(len + 1);
            let byte = *rng.pick(&[0x00u8, 0xff, 0x7f, 0x80, b'a', b'9', b'\\']);
            let n = if rng.one_in(4) {
                1 + rng.below(4096)
            } else {
                1 + rng.below(64)
            };
            input.splice(at..at, std::iter::repeat_n(byte, n));
        }
        // A very long name: long label names and metric names hit line limits and buffers.
        12 => {
            let at = rng.below(len + 1);
            let n = 1 + if rng.one_in(8) {
                rng.below(MAX_INPUT)
            } else {
                rng.below(512)
            };
            input.splice(at..at, std::iter::repeat_n(b'a', n));
        }
        // Truncate.
        13 if len > 0 => {
            input.truncate(rng.below(len));
        }
        // Swap two bytes.
        14 if len > 1 => {
            let (a, b) = (rng.below(len), rng.below(len));
            input.swap(a, b);
        }
        // Replace everything with another input (then later rounds mutate it).
        15 if !corpus.is_empty() => {
            input.clear();
            let other: &Vec<u8> = rng.pick(corpus);
            input.extend_from_slice(other);
        }
        _ => {}
    }
}

/// `bytes` as a Rust byte-string literal: printable ASCII as is, everything else escaped.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 3);
    out.push_str("b\"");
    for &b in bytes {
        for c in std::ascii::escape_default(b) {
            out.push(char::from(c));
        }
    }
    out.push('"');
    out
}

/// `bytes` in hex, 32 bytes a line.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(if i % 32 == 0 { '\n' } else { ' ' });
        }
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The per-target budget: `FUZZ_SECONDS` (fractions allowed), 3 s by default.
pub fn budget() -> Duration {
    std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(3))
}

/// The base seed: `FUZZ_SEED` (decimal or 0x-hex), else from the clock so each CI run explores
/// different inputs.
pub fn base_seed() -> u64 {
    if let Ok(text) = std::env::var("FUZZ_SEED") {
        let text = text.trim();
        let parsed = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        };
        match parsed {
            Ok(seed) => return seed,
            Err(e) => panic!("FUZZ_SEED={text:?} is not a number: {e}"),
        }
    }
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5eed)
}

/// FNV-1a, to give each target its own stream from one base seed.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The committed seed corpus directory of `target` (the workspace's `tests/fixtures/fuzz/`).
pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/fuzz")
        .join(target)
}

/// The files of `target`'s corpus directory, in name order (missing directory: none).
pub fn load_corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())))
        .collect()
}

/// What one exec found wrong: a broken property, described.
pub type Verdict = Result<(), String>;

/// A fuzz target: its name (also its corpus directory), dictionary and extra seeds.
pub struct Target<'a> {
    /// The name, `tests/fixtures/fuzz/<name>/`.
    pub name: &'a str,
    /// Tokens worth inserting for this format.
    pub dict: &'a [&'a [u8]],
    /// Seeds built at run time, added to the committed corpus.
    pub seeds: Vec<Vec<u8>>,
}

/// Runs `exec` on every seed, then on mutated seeds until the budget is spent. Panics (failing the
/// test) on the first input that makes `exec` panic or return an error.
pub fn run(target: Target<'_>, mut exec: impl FnMut(&[u8]) -> Verdict) {
    let base = base_seed();
    let mut corpus = load_corpus(target.name);
    corpus.extend(target.seeds);
    assert!(
        !corpus.is_empty(),
        "fuzz {}: no seeds (expected files under {})",
        target.name,
        corpus_dir(target.name).display()
    );
    let mut rng = Rng::new(base ^ fnv(target.name));
    let budget = budget();
    let start = Instant::now();
    let mut execs: u64 = 0;
    let mut input = Vec::new();
    // The slowest exec and its input's length: a parser that is slow on some input is a
    // denial-of-service risk even when it never panics.
    let mut slowest = (Duration::ZERO, 0usize);
    let seeds = corpus.len();
    loop {
        let seed_pass = (execs as usize) < seeds;
        if seed_pass {
            input.clear();
            input.extend_from_slice(&corpus[execs as usize]);
        } else {
            if start.elapsed() >= budget {
                break;
            }
            input.clear();
            let base: &Vec<u8> = rng.pick(&corpus);
            input.extend_from_slice(base);
            mutate(&mut rng, &mut input, &corpus, target.dict);
        }
        let began = Instant::now();
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| exec(&input)));
        let took = began.elapsed();
        if took > slowest.0 {
            slowest = (took, input.len());
        }
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(format!("property violated: {why}")),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(non-string panic payload)".to_string());
                Some(format!("panic: {message}"))
            }
        };
        if let Some(failure) = failure {
            fail(target.name, base, execs, seed_pass, &input, &failure);
        }
        execs += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz {}: {execs} execs in {secs:.1} s ({:.0}/s), {seeds} seeds, seed {base:#x}; \
         slowest exec {:.1} ms on {} bytes",
        target.name,
        execs as f64 / secs.max(1e-9),
        slowest.0.as_secs_f64() * 1e3,
        slowest.1
    );
}

/// Where a failing input is saved: cargo's `target/tmp` (the `CARGO_TARGET_TMPDIR` of integration
/// tests, which a library does not get), found from the test binary's own path
/// (`target/<profile>/deps/<test>`); the system temp dir when that does not exist.
fn failure_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join("tmp")))
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

fn fail(target: &str, seed: u64, exec: u64, seed_pass: bool, input: &[u8], failure: &str) -> ! {
    let saved = failure_dir().join(format!("fuzz-{target}-{seed:#x}-{exec}.bin"));
    let saved_note = match std::fs::write(&saved, input) {
        Ok(()) => format!("saved to {}", saved.display()),
        Err(e) => format!("could not save it: {e}"),
    };
    let origin = if seed_pass {
        "seed input"
    } else {
        "mutated input"
    };
    panic!(
        "fuzz {target}: {failure}\n{origin} #{exec}, reproduce with FUZZ_SEED={seed:#x}; {saved_note}\n\
         input ({} bytes): {}\nhex:\n{}",
        input.len(),
        escape(input),
        hex(input)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_reports_a_panicking_input() {
        let caught = std::panic::catch_unwind(|| {
            run(
                Target {
                    name: "no-such-corpus",
                    dict: &[],
                    seeds: vec![b"fine".to_vec(), b"bo\x00om".to_vec()],
                },
                |input| {
                    if input.contains(&0) {
                        panic!("zero byte");
                    }
                    Ok(())
                },
            )
        });
        let payload = caught.expect_err("the second seed panics, so the run must fail");
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(message.contains("panic: zero byte"), "{message}");
        assert!(message.contains(r#"b"bo\x00om""#), "{message}");
    }
}
