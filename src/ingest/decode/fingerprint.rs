//! Schema fingerprints: the Avro specification's Parsing Canonical Form and its CRC-64-AVRO
//! fingerprint, as single-object payloads carry it.

use std::collections::HashSet;

use serde_json::Value as Json;

use super::types::{full_name, json_size, resolve_reference};

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Returns the schema's Parsing Canonical Form as the Avro specification defines it: primitives in
/// their simple form, full names, only `name`, `type`, `fields`, `symbols`, `items`, `values` and
/// `size` kept, in that order, no whitespace.
pub(crate) fn canonical_form(json: &Json) -> Result<String, String> {
    let mut out = String::new();
    write_canonical(json, None, &mut HashSet::new(), &mut out)?;
    Ok(out)
}

fn write_canonical(
    json: &Json,
    namespace: Option<&str>,
    defined: &mut HashSet<String>,
    out: &mut String,
) -> Result<(), String> {
    match json {
        Json::String(name) => write_canonical_name(name, namespace, defined, out),
        Json::Array(branches) => {
            out.push('[');
            for (index, branch) in branches.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(branch, namespace, defined, out)?;
            }
            out.push(']');
        }
        Json::Object(map) => match map.get("type") {
            Some(Json::String(type_name)) => match type_name.as_str() {
                "record" | "error" | "enum" | "fixed" => {
                    let (full, own_namespace) = full_name(map, namespace)?;
                    if !defined.insert(full.clone()) {
                        push_json_string(out, &full);
                        return Ok(());
                    }
                    out.push_str("{\"name\":");
                    push_json_string(out, &full);
                    out.push_str(",\"type\":");
                    push_json_string(out, type_name);
                    match type_name.as_str() {
                        "enum" => {
                            out.push_str(",\"symbols\":[");
                            let symbols = map
                                .get("symbols")
                                .and_then(Json::as_array)
                                .ok_or_else(|| format!("enum {full} has no symbols"))?;
                            for (index, symbol) in symbols.iter().enumerate() {
                                if index > 0 {
                                    out.push(',');
                                }
                                let symbol = symbol.as_str().ok_or_else(|| {
                                    format!("enum {full} has a non-string symbol")
                                })?;
                                push_json_string(out, symbol);
                            }
                            out.push(']');
                        }
                        "fixed" => {
                            let size = map
                                .get("size")
                                .and_then(json_size)
                                .ok_or_else(|| format!("fixed {full} has no valid size"))?;
                            out.push_str(",\"size\":");
                            out.push_str(&size.to_string());
                        }
                        _ => {
                            out.push_str(",\"fields\":[");
                            let fields = map
                                .get("fields")
                                .and_then(Json::as_array)
                                .ok_or_else(|| format!("record {full} has no fields array"))?;
                            for (index, field) in fields.iter().enumerate() {
                                if index > 0 {
                                    out.push(',');
                                }
                                let name = field
                                    .get("name")
                                    .and_then(Json::as_str)
                                    .ok_or_else(|| format!("a field of {full} has no name"))?;
                                let field_type = field
                                    .get("type")
                                    .ok_or_else(|| format!("field {full}.{name} has no type"))?;
                                out.push_str("{\"name\":");
                                push_json_string(out, name);
                                out.push_str(",\"type\":");
                                write_canonical(
                                    field_type,
                                    own_namespace.as_deref(),
                                    defined,
                                    out,
                                )?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    out.push('}');
                }
                "array" => {
                    out.push_str("{\"type\":\"array\",\"items\":");
                    write_canonical(
                        map.get("items").ok_or("array has no items")?,
                        namespace,
                        defined,
                        out,
                    )?;
                    out.push('}');
                }
                "map" => {
                    out.push_str("{\"type\":\"map\",\"values\":");
                    write_canonical(
                        map.get("values").ok_or("map has no values")?,
                        namespace,
                        defined,
                        out,
                    )?;
                    out.push('}');
                }
                other => write_canonical_name(other, namespace, defined, out),
            },
            Some(nested) => write_canonical(nested, namespace, defined, out)?,
            None => return Err("schema object has no type".to_owned()),
        },
        other => return Err(format!("{other} is not a schema")),
    }
    Ok(())
}

fn write_canonical_name(
    name: &str,
    namespace: Option<&str>,
    defined: &HashSet<String>,
    out: &mut String,
) {
    if PRIMITIVES.contains(&name) {
        push_json_string(out, name);
    } else {
        let full = resolve_reference(name, namespace, |candidate| defined.contains(candidate));
        push_json_string(out, &full);
    }
}

/// Writes a JSON string literal with only the escapes JSON requires, so non-ASCII text stays UTF-8
/// as the [STRINGS] rule asks.
fn push_json_string(out: &mut String, text: &str) {
    out.push_str(&Json::String(text.to_owned()).to_string());
}

/// CRC-64-AVRO, the Rabin fingerprint the Avro specification defines for schema fingerprints.
pub(crate) fn crc64_avro(bytes: &[u8]) -> u64 {
    pub(crate) const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    pub(crate) static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u64; 256];
        for (index, entry) in table.iter_mut().enumerate() {
            let mut fingerprint = index as u64;
            for _ in 0..8 {
                fingerprint = (fingerprint >> 1) ^ (EMPTY & (fingerprint & 1).wrapping_neg());
            }
            *entry = fingerprint;
        }
        table
    });
    bytes.iter().fold(EMPTY, |fingerprint, &byte| {
        (fingerprint >> 8) ^ table[((fingerprint ^ u64::from(byte)) & 0xff) as usize]
    })
}
