//! The first implementation of canonical JSON, which built the whole value before writing it:
//! kept as the oracle the one-pass writer is tested against.

use std::borrow::Cow;
use std::io::Write as _;

use super::{trim_end_zeros, trim_start_zeros, write_string, CanonicalJsonError, MAX_DEPTH};

/// The canonical bytes of the JSON value in `text`.
pub fn canonical_json(text: &str) -> Result<Vec<u8>, CanonicalJsonError> {
    let mut parser = Parser {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    let value = parser.value(0)?;
    parser.whitespace();
    if parser.at != parser.bytes.len() {
        return Err(parser.error("text after the value"));
    }
    let mut out = Vec::with_capacity(text.len());
    write(&value, &mut out);
    Ok(out)
}

/// A parsed value; strings without escapes borrow from the text (the common case, and the one
/// that keeps this off the allocator on the sink's hot path).
enum Value<'a> {
    Literal(&'static [u8]),
    /// A non-zero number: `-`? `integer` `fraction` `e` `scale`, its digits already stripped of
    /// leading and trailing zeros (so written as they are, it is canonical).
    Number {
        negative: bool,
        integer: &'a [u8],
        fraction: &'a [u8],
        scale: i64,
    },
    String(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    /// Sorted by key, repeated keys removed (the last kept).
    Object(Vec<(Cow<'a, str>, Value<'a>)>),
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
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

    fn value(&mut self, depth: usize) -> Result<Value<'a>, CanonicalJsonError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.whitespace();
        match self.bytes.get(self.at) {
            Some(b'n') => self.expect(b"null").map(|()| Value::Literal(b"null")),
            Some(b't') => self.expect(b"true").map(|()| Value::Literal(b"true")),
            Some(b'f') => self.expect(b"false").map(|()| Value::Literal(b"false")),
            Some(b'"') => self.string().map(Value::String),
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                self.whitespace();
                if self.bytes.get(self.at) == Some(&b']') {
                    self.at += 1;
                    return Ok(Value::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.whitespace();
                    match self.bytes.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Value::Array(items));
                        }
                        _ => return Err(self.error("expected , or ]")),
                    }
                }
            }
            Some(b'{') => {
                self.at += 1;
                let mut entries: Vec<(Cow<'a, str>, Value<'a>)> = Vec::new();
                self.whitespace();
                if self.bytes.get(self.at) == Some(&b'}') {
                    self.at += 1;
                    return Ok(Value::Object(entries));
                }
                loop {
                    self.whitespace();
                    if self.bytes.get(self.at) != Some(&b'"') {
                        return Err(self.error("expected a key"));
                    }
                    let key = self.string()?;
                    self.whitespace();
                    if self.bytes.get(self.at) != Some(&b':') {
                        return Err(self.error("expected :"));
                    }
                    self.at += 1;
                    let item = self.value(depth + 1)?;
                    entries.push((key, item));
                    self.whitespace();
                    match self.bytes.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b'}') => {
                            self.at += 1;
                            // Stable sort keeps repeats in text order; the last one stays.
                            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                            entries.dedup_by(|later, earlier| {
                                if later.0 == earlier.0 {
                                    std::mem::swap(later, earlier);
                                    true
                                } else {
                                    false
                                }
                            });
                            return Ok(Value::Object(entries));
                        }
                        _ => return Err(self.error("expected , or }")),
                    }
                }
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.error("expected a value")),
        }
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
    /// zeros, and the power of ten they are scaled by.
    fn number(&mut self) -> Result<Value<'a>, CanonicalJsonError> {
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
            return Ok(Value::Literal(b"0"));
        }
        let kept = trim_end_zeros(fraction);
        scale += (fraction.len() - kept.len()) as i64;
        fraction = kept;
        if fraction.is_empty() {
            let kept = trim_end_zeros(integer);
            scale += (integer.len() - kept.len()) as i64;
            integer = kept;
        }
        Ok(Value::Number {
            negative,
            integer,
            fraction,
            scale,
        })
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
            while let Some(&byte) = self.bytes.get(self.at) {
                if byte == b'"' || byte == b'\\' || byte < 0x20 {
                    break;
                }
                self.at += 1;
            }
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

fn write(value: &Value<'_>, out: &mut Vec<u8>) {
    match value {
        Value::Literal(literal) => out.extend_from_slice(literal),
        Value::Number {
            negative,
            integer,
            fraction,
            scale,
        } => {
            if *negative {
                out.push(b'-');
            }
            out.extend_from_slice(integer);
            out.extend_from_slice(fraction);
            // Writing into a Vec cannot fail.
            let _ = write!(out, "e{scale}");
        }
        Value::String(text) => write_string(text, out),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::Object(entries) => {
            out.push(b'{');
            for (index, (key, item)) in entries.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write(item, out);
            }
            out.push(b'}');
        }
    }
}
