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
    let mut parser = Parser {
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

enum Value {
    Literal(&'static [u8]),
    /// Already canonical.
    Number(String),
    String(String),
    Array(Vec<Value>),
    /// Sorted by key, repeated keys removed (the last kept).
    Object(Vec<(String, Value)>),
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
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

    fn value(&mut self, depth: usize) -> Result<Value, CanonicalJsonError> {
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
                let mut entries: Vec<(String, Value)> = Vec::new();
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
                            let mut unique: Vec<(String, Value)> =
                                Vec::with_capacity(entries.len());
                            for entry in entries {
                                match unique.last_mut() {
                                    Some(last) if last.0 == entry.0 => *last = entry,
                                    _ => unique.push(entry),
                                }
                            }
                            return Ok(Value::Object(unique));
                        }
                        _ => return Err(self.error("expected , or }")),
                    }
                }
            }
            Some(b'-' | b'0'..=b'9') => self.number().map(Value::Number),
            _ => Err(self.error("expected a value")),
        }
    }

    fn digits(&mut self) -> &[u8] {
        let start = self.at;
        while matches!(self.bytes.get(self.at), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        &self.bytes[start..self.at]
    }

    /// Reads a number and writes its exact value canonically.
    fn number(&mut self) -> Result<String, CanonicalJsonError> {
        let negative = self.bytes.get(self.at) == Some(&b'-');
        if negative {
            self.at += 1;
        }
        let integer = self.digits().to_vec();
        if integer.is_empty() || (integer.len() > 1 && integer[0] == b'0') {
            return Err(self.error("bad number"));
        }
        let mut fraction = Vec::new();
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            fraction = self.digits().to_vec();
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
            let value: i64 = std::str::from_utf8(digits)
                .ok()
                .and_then(|digits| digits.parse().ok())
                .ok_or_else(|| self.error("bad exponent"))?;
            exponent = sign * value;
        }
        let mut significand: Vec<u8> = integer
            .into_iter()
            .chain(fraction.iter().copied())
            .collect();
        let mut scale = exponent - fraction.len() as i64;
        let leading = significand
            .iter()
            .take_while(|digit| **digit == b'0')
            .count();
        significand.drain(..leading);
        if significand.is_empty() {
            return Ok("0".to_owned());
        }
        while significand.last() == Some(&b'0') {
            significand.pop();
            scale += 1;
        }
        let digits = String::from_utf8(significand).map_err(|_| self.error("bad number"))?;
        Ok(format!(
            "{}{digits}e{scale}",
            if negative { "-" } else { "" }
        ))
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

    fn string(&mut self) -> Result<String, CanonicalJsonError> {
        self.at += 1;
        let mut out = String::new();
        loop {
            let start = self.at;
            while let Some(&byte) = self.bytes.get(self.at) {
                if byte == b'"' || byte == b'\\' || byte < 0x20 {
                    break;
                }
                self.at += 1;
            }
            out.push_str(
                std::str::from_utf8(&self.bytes[start..self.at])
                    .map_err(|_| self.error("not UTF-8"))?,
            );
            match self.bytes.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escape = *self
                        .bytes
                        .get(self.at)
                        .ok_or_else(|| self.error("bad escape"))?;
                    self.at += 1;
                    match escape {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
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
                            out.push(
                                char::from_u32(code).ok_or_else(|| self.error("lone surrogate"))?,
                            );
                        }
                        _ => return Err(self.error("bad escape")),
                    }
                }
                _ => return Err(self.error("unterminated string")),
            }
        }
    }
}

fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Literal(literal) => out.extend_from_slice(literal),
        Value::Number(number) => out.extend_from_slice(number.as_bytes()),
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

fn write_string(text: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for character in text.chars() {
        match character {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
            }
            c => {
                let mut buffer = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
            }
        }
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
