//! The Avro type model of a writer schema, compiled from its JSON: every type as a [`WireType`],
//! records in a table so recursive schemas stay finite, and the naming rules (full names,
//! namespaces) the canonical form shares.

use std::collections::HashMap;

use serde_json::Value as Json;

/// A writer type, compiled from the schema JSON. Logical types are dropped (they do not change the
/// encoding), except on `long`, where `occurred_at` needs to know the unit.
#[derive(Debug, Clone)]
pub(crate) enum WireType {
    Null,
    Boolean,
    Int,
    Long {
        logical: Option<String>,
    },
    Float,
    Double,
    Bytes,
    String,
    Fixed(usize),
    Enum(Vec<String>),
    Array(Box<WireType>),
    Map(Box<WireType>),
    Union(Vec<WireType>),
    /// Index into the schema's record table, so recursive records stay finite.
    Record(usize),
}

impl WireType {
    pub(crate) fn describe(&self) -> String {
        match self {
            WireType::Null => "null".to_owned(),
            WireType::Boolean => "boolean".to_owned(),
            WireType::Int => "int".to_owned(),
            WireType::Long { logical: None } => "long".to_owned(),
            WireType::Long {
                logical: Some(logical),
            } => format!("long ({logical})"),
            WireType::Float => "float".to_owned(),
            WireType::Double => "double".to_owned(),
            WireType::Bytes => "bytes".to_owned(),
            WireType::String => "string".to_owned(),
            WireType::Fixed(size) => format!("fixed({size})"),
            WireType::Enum(_) => "enum".to_owned(),
            WireType::Array(_) => "array".to_owned(),
            WireType::Map(_) => "map".to_owned(),
            WireType::Union(_) => "union".to_owned(),
            WireType::Record(_) => "record".to_owned(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct RecordDef {
    pub(crate) fields: Vec<FieldDef>,
}

#[derive(Debug)]
pub(crate) struct FieldDef {
    pub(crate) name: String,
    pub(crate) wire: WireType,
    pub(crate) default: Option<Json>,
}

/// Compiles schema JSON (already validated by apache-avro) into [`WireType`]s. Works from the JSON
/// rather than `apache_avro::Schema` because the latter folds `fixed(16)` with logical type `uuid`
/// into the same variant as a `string` uuid, losing how it is encoded.
#[derive(Default)]
pub(crate) struct Compiler {
    pub(crate) records: Vec<RecordDef>,
    named: HashMap<String, WireType>,
}

impl Compiler {
    pub(crate) fn compile(
        &mut self,
        json: &Json,
        namespace: Option<&str>,
    ) -> Result<WireType, String> {
        match json {
            Json::String(name) => self.primitive_or_named(name, namespace),
            Json::Array(branches) => branches
                .iter()
                .map(|branch| self.compile(branch, namespace))
                .collect::<Result<_, _>>()
                .map(WireType::Union),
            Json::Object(map) => match map.get("type") {
                Some(Json::String(type_name)) => match type_name.as_str() {
                    "record" | "error" => {
                        let (full_name, own_namespace) = full_name(map, namespace)?;
                        let index = self.records.len();
                        self.records.push(RecordDef { fields: Vec::new() });
                        self.named
                            .insert(full_name.clone(), WireType::Record(index));
                        let field_list = map
                            .get("fields")
                            .and_then(Json::as_array)
                            .ok_or_else(|| format!("record {full_name} has no fields array"))?;
                        let mut fields = Vec::with_capacity(field_list.len());
                        for field in field_list {
                            let name = field
                                .get("name")
                                .and_then(Json::as_str)
                                .ok_or_else(|| format!("a field of {full_name} has no name"))?;
                            let field_type = field
                                .get("type")
                                .ok_or_else(|| format!("field {full_name}.{name} has no type"))?;
                            fields.push(FieldDef {
                                name: name.to_owned(),
                                wire: self.compile(field_type, own_namespace.as_deref())?,
                                default: field.get("default").cloned(),
                            });
                        }
                        self.records[index].fields = fields;
                        Ok(WireType::Record(index))
                    }
                    "enum" => {
                        let (full_name, _) = full_name(map, namespace)?;
                        let symbols = map
                            .get("symbols")
                            .and_then(Json::as_array)
                            .ok_or_else(|| format!("enum {full_name} has no symbols"))?
                            .iter()
                            .map(|symbol| symbol.as_str().map(str::to_owned))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| format!("enum {full_name} has a non-string symbol"))?;
                        let wire = WireType::Enum(symbols);
                        self.named.insert(full_name, wire.clone());
                        Ok(wire)
                    }
                    "fixed" => {
                        let (full_name, _) = full_name(map, namespace)?;
                        let size = map
                            .get("size")
                            .and_then(json_size)
                            .ok_or_else(|| format!("fixed {full_name} has no valid size"))?;
                        let wire = WireType::Fixed(size);
                        self.named.insert(full_name, wire.clone());
                        Ok(wire)
                    }
                    "array" => {
                        let items = map.get("items").ok_or("array has no items")?;
                        Ok(WireType::Array(Box::new(self.compile(items, namespace)?)))
                    }
                    "map" => {
                        let values = map.get("values").ok_or("map has no values")?;
                        Ok(WireType::Map(Box::new(self.compile(values, namespace)?)))
                    }
                    "long" => Ok(WireType::Long {
                        logical: map
                            .get("logicalType")
                            .and_then(Json::as_str)
                            .map(str::to_owned),
                    }),
                    other => self.primitive_or_named(other, namespace),
                },
                Some(nested) => self.compile(nested, namespace),
                None => Err("schema object has no type".to_owned()),
            },
            other => Err(format!("{other} is not a schema")),
        }
    }

    fn primitive_or_named(&self, name: &str, namespace: Option<&str>) -> Result<WireType, String> {
        Ok(match name {
            "null" => WireType::Null,
            "boolean" => WireType::Boolean,
            "int" => WireType::Int,
            "long" => WireType::Long { logical: None },
            "float" => WireType::Float,
            "double" => WireType::Double,
            "bytes" => WireType::Bytes,
            "string" => WireType::String,
            _ => {
                let full = resolve_reference(name, namespace, |candidate| {
                    self.named.contains_key(candidate)
                });
                self.named
                    .get(&full)
                    .cloned()
                    .ok_or_else(|| format!("unknown type {name}"))?
            }
        })
    }
}

pub(crate) fn json_size(value: &Json) -> Option<usize> {
    match value {
        Json::Number(number) => number.as_u64().and_then(|size| usize::try_from(size).ok()),
        Json::String(text) => text.parse().ok(),
        _ => None,
    }
}

/// Returns a named type's full name and the namespace its children inherit.
pub(crate) fn full_name(
    map: &serde_json::Map<String, Json>,
    enclosing: Option<&str>,
) -> Result<(String, Option<String>), String> {
    let name = map
        .get("name")
        .and_then(Json::as_str)
        .ok_or("named type has no name")?;
    if let Some((namespace, _)) = name.rsplit_once('.') {
        return Ok((name.to_owned(), Some(namespace.to_owned())));
    }
    let namespace = match map.get("namespace") {
        Some(Json::String(namespace)) if namespace.is_empty() => None,
        Some(Json::String(namespace)) => Some(namespace.clone()),
        _ => enclosing.map(str::to_owned),
    };
    let full = match &namespace {
        Some(namespace) => format!("{namespace}.{name}"),
        None => name.to_owned(),
    };
    Ok((full, namespace))
}

/// Resolves a type reference: a dotted name is already full; otherwise the enclosing namespace is
/// tried first, then the null namespace.
pub(crate) fn resolve_reference(
    name: &str,
    namespace: Option<&str>,
    is_defined: impl Fn(&str) -> bool,
) -> String {
    if name.contains('.') {
        return name.to_owned();
    }
    match namespace {
        Some(namespace) => {
            let qualified = format!("{namespace}.{name}");
            if is_defined(&qualified) || !is_defined(name) {
                qualified
            } else {
                name.to_owned()
            }
        }
        None => name.to_owned(),
    }
}
