//! The first implementation of canonical JSON, which built the whole value before writing it:
//! kept as the oracle the one-pass writer is tested against. It reads strings and numbers with
//! the module's own [`Parser`] (whose scanning has tests of its own); what it stands for is the
//! other way of putting objects in order and writing them.

use std::borrow::Cow;

use super::{write_string, CanonicalJsonError, Number, Parser, MAX_DEPTH};

/// The canonical bytes of the JSON value in `text`.
pub fn canonical_json(text: &str) -> Result<Vec<u8>, CanonicalJsonError> {
    let mut parser = Parser {
        text,
        bytes: text.as_bytes(),
        at: 0,
        nul: false,
        huge_number: false,
    };
    let value = value(&mut parser, 0)?;
    parser.whitespace();
    if parser.at != parser.bytes.len() {
        return Err(parser.error("text after the value"));
    }
    let mut out = Vec::with_capacity(text.len());
    write(&value, &mut out);
    Ok(out)
}

/// A parsed value.
enum Value<'a> {
    Literal(&'static [u8]),
    Number(Number<'a>),
    String(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    /// Sorted by key, repeated keys removed (the last kept).
    Object(Vec<(Cow<'a, str>, Value<'a>)>),
}

fn value<'a>(parser: &mut Parser<'a>, depth: usize) -> Result<Value<'a>, CanonicalJsonError> {
    if depth > MAX_DEPTH {
        return Err(parser.error("nested too deeply"));
    }
    parser.whitespace();
    match parser.bytes.get(parser.at) {
        Some(b'n') => parser.expect(b"null").map(|()| Value::Literal(b"null")),
        Some(b't') => parser.expect(b"true").map(|()| Value::Literal(b"true")),
        Some(b'f') => parser.expect(b"false").map(|()| Value::Literal(b"false")),
        Some(b'"') => parser.string().map(Value::String),
        Some(b'[') => {
            parser.at += 1;
            let mut items = Vec::new();
            parser.whitespace();
            if parser.bytes.get(parser.at) == Some(&b']') {
                parser.at += 1;
                return Ok(Value::Array(items));
            }
            loop {
                items.push(value(parser, depth + 1)?);
                parser.whitespace();
                match parser.bytes.get(parser.at) {
                    Some(b',') => parser.at += 1,
                    Some(b']') => {
                        parser.at += 1;
                        return Ok(Value::Array(items));
                    }
                    _ => return Err(parser.error("expected , or ]")),
                }
            }
        }
        Some(b'{') => {
            parser.at += 1;
            let mut entries: Vec<(Cow<'a, str>, Value<'a>)> = Vec::new();
            parser.whitespace();
            if parser.bytes.get(parser.at) == Some(&b'}') {
                parser.at += 1;
                return Ok(Value::Object(entries));
            }
            loop {
                parser.whitespace();
                if parser.bytes.get(parser.at) != Some(&b'"') {
                    return Err(parser.error("expected a key"));
                }
                let key = parser.string()?;
                parser.whitespace();
                if parser.bytes.get(parser.at) != Some(&b':') {
                    return Err(parser.error("expected :"));
                }
                parser.at += 1;
                let item = value(parser, depth + 1)?;
                entries.push((key, item));
                parser.whitespace();
                match parser.bytes.get(parser.at) {
                    Some(b',') => parser.at += 1,
                    Some(b'}') => {
                        parser.at += 1;
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
                    _ => return Err(parser.error("expected , or }")),
                }
            }
        }
        Some(b'-' | b'0'..=b'9') => {
            Ok(parser.number()?.map_or(Value::Literal(b"0"), Value::Number))
        }
        _ => Err(parser.error("expected a value")),
    }
}

fn write(value: &Value<'_>, out: &mut Vec<u8>) {
    match value {
        Value::Literal(literal) => out.extend_from_slice(literal),
        Value::Number(number) => number.write(out),
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
