//! Canonical JSON: one byte string per JSON value, whatever its formatting.
//!
//! The sink holds `details` as the producer wrote it; PostgreSQL stores it as `jsonb` and gives
//! back its own rendering: keys reordered, whitespace changed, escapes decoded, `47e23` written
//! out as `4700000000000000000000000`, `1.50` kept as `1.50`, the last of repeated keys kept. Both
//! denote the same value, and this writes that value one way: object keys sorted by their bytes
//! (the last of repeated keys wins), no whitespace, strings with the minimal escapes, and every
//! number as its exact decimal value, `<digits>e<exponent>` with no leading or trailing zero
//! (`0` for zero). Numbers are never rounded through a double: `jsonb` keeps decimals exact,
//! and so does this.
//!
//! The parser is a small one of its own because the values must stay exact (serde_json parses
//! numbers into doubles, and `47e23` and `4700000000000000000000000` into different ones).

use std::borrow::Cow;

/// Why a text could not be canonicalised.
#[derive(Debug, thiserror::Error)]
#[error("details is not JSON at byte {at}: {what}")]
pub struct CanonicalJsonError {
    at: usize,
    what: &'static str,
}

/// Nesting deeper than this is refused rather than recursed into.
const MAX_DEPTH: usize = 256;

/// The canonical bytes of the JSON value in `text`.
pub fn canonical_json(text: &str) -> Result<Vec<u8>, CanonicalJsonError> {
    let mut out = Vec::with_capacity(capacity_for(text));
    canonicalize(text, &mut out)?;
    Ok(out)
}

/// Room for the canonical form of `text` in the usual case: every number gains an exponent
/// (`42` is written `42e0`), whitespace goes.
pub fn capacity_for(text: &str) -> usize {
    text.len() + text.len() / 4 + 16
}

/// What [`canonicalize`] saw of a value besides its canonical bytes: enough for a caller that
/// must also judge the value (the decoder's rules for `details`) to do it without a second parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonFacts {
    /// The top-level value is an object.
    pub object: bool,
    /// Some string or key holds U+0000 (written `\u0000`), which PostgreSQL's `jsonb` refuses.
    pub nul: bool,
    /// The deepest nesting of arrays and objects (0 for a scalar).
    pub depth: usize,
    /// Some number is 1e300 or more in magnitude: near or past the largest double (1.8e308),
    /// where a parser that reads numbers as doubles refuses it.
    pub huge_number: bool,
}

/// Writes the canonical bytes of the JSON value in `text` to `out` (appended), in one pass over
/// the text without building the value: every object's members are written as they come and
/// only an object whose keys are not already in order (or repeat) is rearranged in place.
pub fn canonicalize(text: &str, out: &mut Vec<u8>) -> Result<JsonFacts, CanonicalJsonError> {
    let mut writer = Writer {
        parser: Parser {
            text,
            bytes: text.as_bytes(),
            at: 0,
            nul: false,
            huge_number: false,
        },
        out,
        members: Vec::new(),
        scratch: Vec::new(),
        depth: 0,
    };
    let object = writer.parser.peek_value() == Some(b'{');
    writer.value(0)?;
    writer.parser.whitespace();
    if writer.parser.at != writer.parser.bytes.len() {
        return Err(writer.parser.error("text after the value"));
    }
    Ok(JsonFacts {
        object,
        nul: writer.parser.nul,
        depth: writer.depth,
        huge_number: writer.parser.huge_number,
    })
}

/// One member of an object being written: its key and where `"key":value` lies in the output.
struct Member<'a> {
    key: Cow<'a, str>,
    start: usize,
    end: usize,
}

struct Writer<'a, 'o> {
    parser: Parser<'a>,
    out: &'o mut Vec<u8>,
    /// The members of the objects open on the way down, innermost last.
    members: Vec<Member<'a>>,
    /// Where an object whose keys are out of order is copied while it is rewritten.
    scratch: Vec<u8>,
    depth: usize,
}

impl<'a> Writer<'a, '_> {
    fn value(&mut self, depth: usize) -> Result<(), CanonicalJsonError> {
        if depth > MAX_DEPTH {
            return Err(self.parser.error("nested too deeply"));
        }
        self.parser.whitespace();
        match self.parser.bytes.get(self.parser.at) {
            Some(b'n') => self.literal(b"null"),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'"') => {
                let text = self.parser.string()?;
                write_quoted(&text, matches!(text, Cow::Borrowed(_)), self.out);
                Ok(())
            }
            Some(b'[') => {
                self.depth = self.depth.max(depth + 1);
                self.parser.at += 1;
                self.out.push(b'[');
                self.parser.whitespace();
                if self.parser.bytes.get(self.parser.at) == Some(&b']') {
                    self.parser.at += 1;
                    self.out.push(b']');
                    return Ok(());
                }
                loop {
                    self.value(depth + 1)?;
                    self.parser.whitespace();
                    match self.parser.bytes.get(self.parser.at) {
                        Some(b',') => {
                            self.parser.at += 1;
                            self.out.push(b',');
                        }
                        Some(b']') => {
                            self.parser.at += 1;
                            self.out.push(b']');
                            return Ok(());
                        }
                        _ => return Err(self.parser.error("expected , or ]")),
                    }
                }
            }
            Some(b'{') => {
                self.depth = self.depth.max(depth + 1);
                self.parser.at += 1;
                let open = self.out.len();
                self.out.push(b'{');
                self.parser.whitespace();
                if self.parser.bytes.get(self.parser.at) == Some(&b'}') {
                    self.parser.at += 1;
                    self.out.push(b'}');
                    return Ok(());
                }
                let base = self.members.len();
                loop {
                    self.parser.whitespace();
                    if self.parser.bytes.get(self.parser.at) != Some(&b'"') {
                        return Err(self.parser.error("expected a key"));
                    }
                    let key = self.parser.string()?;
                    self.parser.whitespace();
                    if self.parser.bytes.get(self.parser.at) != Some(&b':') {
                        return Err(self.parser.error("expected :"));
                    }
                    self.parser.at += 1;
                    if self.members.len() > base {
                        self.out.push(b',');
                    }
                    let start = self.out.len();
                    write_quoted(&key, matches!(key, Cow::Borrowed(_)), self.out);
                    self.out.push(b':');
                    self.value(depth + 1)?;
                    let end = self.out.len();
                    self.members.push(Member { key, start, end });
                    self.parser.whitespace();
                    match self.parser.bytes.get(self.parser.at) {
                        Some(b',') => self.parser.at += 1,
                        Some(b'}') => {
                            self.parser.at += 1;
                            self.order_members(open, base);
                            self.out.push(b'}');
                            return Ok(());
                        }
                        _ => return Err(self.parser.error("expected , or }")),
                    }
                }
            }
            Some(b'-' | b'0'..=b'9') => {
                match self.parser.number()? {
                    None => self.out.push(b'0'),
                    Some(number) => number.write(self.out),
                }
                Ok(())
            }
            _ => Err(self.parser.error("expected a value")),
        }
    }

    fn literal(&mut self, literal: &'static [u8]) -> Result<(), CanonicalJsonError> {
        self.parser.expect(literal)?;
        self.out.extend_from_slice(literal);
        Ok(())
    }

    /// Puts the members of the object opened at `open` (the `members` from `base` on, written
    /// in text order after the brace) in key order, the last of repeated keys kept; then drops
    /// them from `members`. Keys already in strictly ascending order (the usual case) cost one
    /// comparison each and no copy.
    fn order_members(&mut self, open: usize, base: usize) {
        let members = &mut self.members[base..];
        let ordered = members
            .windows(2)
            .all(|pair| pair[0].key.as_bytes() < pair[1].key.as_bytes());
        if !ordered {
            let body = open + 1;
            self.scratch.clear();
            self.scratch.extend_from_slice(&self.out[body..]);
            self.out.truncate(body);
            // Stable: repeats stay in text order, so the last of each run is the one kept.
            members.sort_by(|a, b| a.key.as_bytes().cmp(b.key.as_bytes()));
            let mut first = true;
            for (index, member) in members.iter().enumerate() {
                if members
                    .get(index + 1)
                    .is_some_and(|next| next.key == member.key)
                {
                    continue;
                }
                if !first {
                    self.out.push(b',');
                }
                first = false;
                self.out
                    .extend_from_slice(&self.scratch[member.start - body..member.end - body]);
            }
        }
        self.members.truncate(base);
    }
}

/// A non-zero number: `-`? `integer` `fraction` `e` `scale`, its digits already stripped of
/// leading and trailing zeros (so written as they are, it is canonical).
struct Number<'a> {
    negative: bool,
    integer: &'a [u8],
    fraction: &'a [u8],
    scale: i64,
}

impl Number<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        if self.negative {
            out.push(b'-');
        }
        out.extend_from_slice(self.integer);
        out.extend_from_slice(self.fraction);
        out.push(b'e');
        out.extend_from_slice(itoa::Buffer::new().format(self.scale).as_bytes());
    }
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
    /// A string decoded to U+0000 was read.
    nul: bool,
    /// A number of magnitude 1e300 or more was read.
    huge_number: bool,
}

impl<'a> Parser<'a> {
    fn error(&self, what: &'static str) -> CanonicalJsonError {
        CanonicalJsonError { at: self.at, what }
    }

    fn whitespace(&mut self) {
        while matches!(self.bytes.get(self.at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, literal: &'static [u8]) -> Result<(), CanonicalJsonError> {
        if self.bytes[self.at..].starts_with(literal) {
            self.at += literal.len();
            Ok(())
        } else {
            Err(self.error("unexpected text"))
        }
    }

    /// The first byte of the value ahead, after whitespace.
    fn peek_value(&mut self) -> Option<u8> {
        self.whitespace();
        self.bytes.get(self.at).copied()
    }

    fn digits(&mut self) -> &'a [u8] {
        let bytes = self.bytes;
        let start = self.at;
        while matches!(bytes.get(self.at), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        &bytes[start..self.at]
    }

    /// Reads a number as its exact value: the significand's digits without leading or trailing
    /// zeros, and the power of ten they are scaled by; `None` for zero.
    fn number(&mut self) -> Result<Option<Number<'a>>, CanonicalJsonError> {
        let negative = self.bytes.get(self.at) == Some(&b'-');
        if negative {
            self.at += 1;
        }
        let mut integer = self.digits();
        if integer.is_empty() || (integer.len() > 1 && integer[0] == b'0') {
            return Err(self.error("bad number"));
        }
        let mut fraction: &[u8] = &[];
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            fraction = self.digits();
            if fraction.is_empty() {
                return Err(self.error("bad number"));
            }
        }
        let mut exponent: i64 = 0;
        if matches!(self.bytes.get(self.at), Some(b'e' | b'E')) {
            self.at += 1;
            let sign = match self.bytes.get(self.at) {
                Some(b'-') => {
                    self.at += 1;
                    -1
                }
                Some(b'+') => {
                    self.at += 1;
                    1
                }
                _ => 1,
            };
            let digits = self.digits();
            if digits.is_empty() {
                return Err(self.error("bad number"));
            }
            // Leading zeros do not change the exponent (`1e0000000001` is 10).
            let digits = match trim_start_zeros(digits) {
                [] => &digits[..1],
                significant => significant,
            };
            // Beyond this no stored number can reach (PostgreSQL's numeric has ~131,072 digits).
            if digits.len() > 9 {
                return Err(self.error("exponent out of range"));
            }
            let value = digits
                .iter()
                .fold(0i64, |value, digit| value * 10 + i64::from(digit - b'0'));
            exponent = sign * value;
        }
        // The significand is `integer` followed by `fraction`, scaled by 10^scale.
        let mut scale = exponent - fraction.len() as i64;
        integer = trim_start_zeros(integer);
        if integer.is_empty() {
            fraction = trim_start_zeros(fraction);
        }
        if integer.is_empty() && fraction.is_empty() {
            return Ok(None);
        }
        let kept = trim_end_zeros(fraction);
        scale += (fraction.len() - kept.len()) as i64;
        fraction = kept;
        if fraction.is_empty() {
            let kept = trim_end_zeros(integer);
            scale += (integer.len() - kept.len()) as i64;
            integer = kept;
        }
        // The leading digit's power of ten.
        let magnitude = scale + (integer.len() + fraction.len()) as i64 - 1;
        self.huge_number |= magnitude >= 300;
        Ok(Some(Number {
            negative,
            integer,
            fraction,
            scale,
        }))
    }

    fn hex4(&mut self) -> Result<u32, CanonicalJsonError> {
        let hex = self
            .bytes
            .get(self.at..self.at + 4)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .ok_or_else(|| self.error("bad \\u escape"))?;
        self.at += 4;
        Ok(hex)
    }

    /// Reads a string; one without escapes is borrowed from the text.
    fn string(&mut self) -> Result<Cow<'a, str>, CanonicalJsonError> {
        self.at += 1;
        let mut out: Option<String> = None;
        loop {
            let start = self.at;
            self.at = plain_run_end(self.bytes, self.at);
            // The run ends at an ASCII byte or at the end, so it is whole characters.
            let run = self
                .text
                .get(start..self.at)
                .ok_or_else(|| self.error("not UTF-8"))?;
            match self.bytes.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(match out {
                        None => Cow::Borrowed(run),
                        Some(mut out) => {
                            out.push_str(run);
                            Cow::Owned(out)
                        }
                    });
                }
                Some(b'\\') => {
                    let out = out.get_or_insert_with(String::new);
                    out.push_str(run);
                    self.at += 1;
                    let escape = *self
                        .bytes
                        .get(self.at)
                        .ok_or_else(|| self.error("bad escape"))?;
                    self.at += 1;
                    let character = match escape {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let first = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&first) {
                                if !self.bytes[self.at..].starts_with(b"\\u") {
                                    return Err(self.error("lone surrogate"));
                                }
                                self.at += 2;
                                let second = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&second) {
                                    return Err(self.error("lone surrogate"));
                                }
                                0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                            } else {
                                first
                            };
                            self.nul |= code == 0;
                            char::from_u32(code).ok_or_else(|| self.error("lone surrogate"))?
                        }
                        _ => return Err(self.error("bad escape")),
                    };
                    out.push(character);
                }
                _ => return Err(self.error("unterminated string")),
            }
        }
    }
}

fn trim_start_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|digit| **digit == b'0').count();
    &digits[zeros..]
}

fn trim_end_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits
        .iter()
        .rev()
        .take_while(|digit| **digit == b'0')
        .count();
    &digits[..digits.len() - zeros]
}

/// Where the run of string bytes from `at` that need no escape (no `"`, `\\` or control
/// character) ends: eight bytes at a time while none of them is one, then byte by byte.
fn plain_run_end(bytes: &[u8], mut at: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    // Whether any byte of `word` is below `limit` (at most 0x80): exact for "any", which is all
    // that is asked here.
    fn any_below(word: u64, limit: u8) -> bool {
        word.wrapping_sub(ONES * u64::from(limit)) & !word & HIGH_BITS != 0
    }
    fn any_equal(word: u64, byte: u8) -> bool {
        any_below(word ^ (ONES * u64::from(byte)), 1)
    }
    while let Some(chunk) = bytes.get(at..at + 8) {
        let Ok(chunk) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(chunk);
        if any_below(word, 0x20) || any_equal(word, b'"') || any_equal(word, b'\\') {
            break;
        }
        at += 8;
    }
    while let Some(&byte) = bytes.get(at) {
        if byte == b'"' || byte == b'\\' || byte < 0x20 {
            break;
        }
        at += 1;
    }
    at
}

/// Writes a string as [`Parser::string`] read it: one it could borrow from the text (`plain`)
/// has nothing to escape (the read stops at every byte that would need it), so it is copied as
/// it is.
fn write_quoted(text: &str, plain: bool, out: &mut Vec<u8>) {
    if plain {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        write_string(text, out);
    }
}

/// Writes `text` quoted, escaping only `"`, `\` and the control characters (as `\u00xx`);
/// everything else is copied as it is, run by run.
fn write_string(text: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        if byte != b'"' && byte != b'\\' && byte >= 0x20 {
            continue;
        }
        out.extend_from_slice(&bytes[start..index]);
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            control => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(control >> 4)],
                HEX[usize::from(control & 0xf)],
            ]),
        }
        start = index + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn canonical(text: &str) -> String {
        String::from_utf8(canonical_json(text).unwrap()).unwrap()
    }

    #[test]
    fn formatting_key_order_and_escapes_do_not_matter() {
        assert_eq!(
            canonical(r#"{ "b" : [ 1 , true , null ] , "a" : "\u00e9\n\ud83e\udd80" }"#),
            "{\"a\":\"é\\u000a🦀\",\"b\":[1e0,true,null]}"
        );
        assert_eq!(
            canonical(r#"{"k":1,"k":2}"#),
            r#"{"k":2e0}"#,
            "the last repeat wins"
        );
    }

    #[test]
    fn numbers_are_their_exact_decimal_value() {
        for same in [
            ["100", "1e2"],
            ["100", "100.0"],
            ["0", "-0"],
            ["0", "0.000e5"],
            ["0.5", "5e-1"],
            ["47e23", "4700000000000000000000000"],
            ["1.50", "1.5"],
            ["-12.5E+1", "-125"],
        ] {
            assert_eq!(canonical(same[0]), canonical(same[1]), "{same:?}");
        }
        assert_ne!(
            canonical("0.1"),
            canonical("0.10000000000000001"),
            "never through a double"
        );
        assert_eq!(
            canonical("1.000000000000000000001"),
            "1000000000000000000001e-21"
        );
    }

    #[test]
    fn what_is_not_json_is_refused() {
        for bad in [
            "",
            "{",
            "[1,]",
            "01",
            "1.",
            "\"\\ud800\"",
            "{\"a\" 1}",
            "1 2",
            "\"a",
        ] {
            assert!(canonical_json(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn facts_describe_the_value() {
        let facts = |text: &str| canonicalize(text, &mut Vec::new()).unwrap();
        assert_eq!(
            facts(r#"{"a":[{"b":1}],"c":"\u0000"}"#),
            JsonFacts {
                object: true,
                nul: true,
                depth: 3,
                huge_number: false
            }
        );
        let scalar = facts(" 1e300 ");
        assert!(!scalar.object && !scalar.nul && scalar.huge_number && scalar.depth == 0);
        assert!(!facts("[9.99e299, 1e-400]").huge_number);
        assert!(facts("[100000e295]").huge_number);
        assert!(!facts(r#"{"a":"\u0001"}"#).nul);
    }

    #[test]
    fn a_plain_run_ends_at_the_first_byte_to_escape_wherever_it_is() {
        for special in (0u8..=255).filter(|b| *b == b'"' || *b == b'\\' || *b < 0x20) {
            for filler in [b'a', 0x7f, 0x80, 0xc3, 0xff, b'!', b'#', b']'] {
                for position in 0..20 {
                    let mut bytes = vec![filler; 20];
                    bytes[position] = special;
                    assert_eq!(
                        plain_run_end(&bytes, 0),
                        position,
                        "{special:#x} {filler:#x}"
                    );
                    if position > 2 {
                        assert_eq!(plain_run_end(&bytes, 2), position);
                    }
                }
                assert_eq!(plain_run_end(&[filler; 19], 0), 19);
            }
        }
    }

    #[test]
    fn leading_zeros_of_an_exponent_do_not_count() {
        assert_eq!(canonical("1e0000000001"), "1e1");
        assert_eq!(canonical("1e-0000000000"), "1e0");
        assert!(canonical_json("1e1000000000").is_err());
    }

    /// Random documents, most of them JSON, some broken: the one-pass writer gives the bytes the
    /// value-building implementation gave, or fails at the same byte.
    #[test]
    fn writes_what_the_value_building_implementation_wrote() {
        let mut rng = StdRng::seed_from_u64(12);
        let mut rearranged = 0;
        for round in 0..20_000 {
            let mut text = String::new();
            random_value(&mut rng, 0, &mut text);
            if round % 4 == 3 {
                // Break one byte somewhere.
                let at = rng.random_range(0..=text.len());
                let at = (0..=at)
                    .rev()
                    .find(|at| text.is_char_boundary(*at))
                    .unwrap_or(0);
                let junk = [",", "}", "]", "\\", "\"", ":", " ", "0", "x"][rng.random_range(0..9)];
                text.insert_str(at, junk);
            }
            let expected = reference::canonical_json(&text);
            let got = canonical_json(&text);
            match (&expected, &got) {
                (Ok(expected), Ok(got)) => {
                    assert_eq!(
                        String::from_utf8_lossy(got),
                        String::from_utf8_lossy(expected),
                        "{text}"
                    );
                    rearranged += usize::from(text.contains(r#""b":1,"a""#));
                }
                (Err(expected), Err(got)) => {
                    assert_eq!((got.at, got.what), (expected.at, expected.what), "{text}")
                }
                _ => panic!("{text}: {expected:?} then, {got:?} now"),
            }
        }
        assert!(rearranged > 0, "no document had keys out of order");
    }

    fn random_value(rng: &mut StdRng, depth: usize, out: &mut String) {
        let space = |rng: &mut StdRng, out: &mut String| {
            if rng.random_bool(0.2) {
                out.push_str([" ", "\n", "\t ", "\r\n"][rng.random_range(0..4)]);
            }
        };
        space(rng, out);
        let pick = if depth >= 4 {
            rng.random_range(0..5)
        } else {
            rng.random_range(0..7)
        };
        match pick {
            0 => out.push_str(["null", "true", "false"][rng.random_range(0..3)]),
            1 | 2 => random_number(rng, out),
            3 | 4 => random_string(rng, out),
            5 => {
                out.push('[');
                for index in 0..rng.random_range(0..4) {
                    if index > 0 {
                        out.push(',');
                    }
                    random_value(rng, depth + 1, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                let keys = ["a", "b", "c", "ab", "a\\u0062", "\\\"", "é", "\\u00e9", "B"];
                let count = rng.random_range(0..5);
                for index in 0..count {
                    if index > 0 {
                        out.push(',');
                    }
                    space(rng, out);
                    // Mostly ascending keys, sometimes any order or a repeat.
                    let key = if rng.random_bool(0.7) {
                        ["a", "b", "c", "d", "e"][index]
                    } else {
                        keys[rng.random_range(0..keys.len())]
                    };
                    out.push('"');
                    out.push_str(key);
                    out.push('"');
                    space(rng, out);
                    out.push(':');
                    random_value(rng, depth + 1, out);
                    space(rng, out);
                }
                if count == 2 && rng.random_bool(0.1) {
                    out.push_str(r#","b":1,"a":2"#);
                }
                out.push('}');
            }
        }
        space(rng, out);
    }

    fn random_number(rng: &mut StdRng, out: &mut String) {
        if rng.random_bool(0.3) {
            out.push('-');
        }
        let digits = |rng: &mut StdRng, out: &mut String, count: usize| {
            for _ in 0..count {
                out.push(char::from(b'0' + rng.random_range(0..10u8)));
            }
        };
        if rng.random_bool(0.3) {
            out.push('0');
        } else {
            out.push(char::from(b'1' + rng.random_range(0..9u8)));
            let count = rng.random_range(0..25);
            digits(rng, out, count);
        }
        if rng.random_bool(0.4) {
            out.push('.');
            let count = rng.random_range(1..25);
            digits(rng, out, count);
        }
        if rng.random_bool(0.3) {
            out.push(['e', 'E'][rng.random_range(0..2)]);
            out.push_str(["", "+", "-"][rng.random_range(0..3)]);
            let count = rng.random_range(1..5);
            digits(rng, out, count);
        }
    }

    fn random_string(rng: &mut StdRng, out: &mut String) {
        const PIECES: [&str; 14] = [
            "plain",
            " ",
            "é",
            "🦀",
            "\\n",
            "\\\"",
            "\\\\",
            "\\/",
            "\\u0000",
            "\\u001f",
            "\\u00e9",
            "\\ud83e\\udd80",
            "\\ud800",
            "\\b\\f\\r\\t",
        ];
        out.push('"');
        for _ in 0..rng.random_range(0..6) {
            out.push_str(PIECES[rng.random_range(0..PIECES.len())]);
        }
        out.push('"');
    }
}
