//! `auditflow schemas check`: can every registered version of a subject be read by auditflow?
//!
//! A producer team gates a schema change in its CI with it, before the change reaches the sink:
//! it fetches every version of the subject (`<topic>-value` by default, the TopicNameStrategy
//! subject) from the schema registry and runs on each the very check and compilation the sink
//! runs when it first meets the schema's id ([`check_resolvable`]). Exit 0 when all can be read,
//! 1 when any cannot (or the registry cannot be asked), 2 on bad configuration.

use std::fmt;

use serde::Serialize;

use crate::ingest::decode::check_resolvable;
use crate::ingest::decode::registry::{RegistryError, RegistrySchema, SchemaRegistry};

/// What the check found for one subject.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The subject checked.
    pub subject: String,
    /// The registry's base URLs.
    pub registry: Vec<String>,
    /// Every version, ascending.
    pub versions: Vec<VersionVerdict>,
}

/// One version's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct VersionVerdict {
    /// The version within the subject.
    pub version: u32,
    /// The global schema id producers write.
    pub id: u32,
    /// True when auditflow can resolve data written with it into its reader schema.
    pub readable: bool,
    /// Why not, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl CheckReport {
    /// True when every version can be read (and there is at least one).
    pub fn all_readable(&self) -> bool {
        !self.versions.is_empty() && self.versions.iter().all(|version| version.readable)
    }

    /// Versions that cannot be read.
    pub fn num_unreadable(&self) -> usize {
        self.versions
            .iter()
            .filter(|version| !version.readable)
            .count()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unreadable = self.num_unreadable();
        writeln!(
            f,
            "subject {} at {}: {} version(s), {} readable, {} not",
            self.subject,
            self.registry.join(", "),
            self.versions.len(),
            self.versions.len() - unreadable,
            unreadable
        )?;
        for version in &self.versions {
            match &version.reason {
                None => writeln!(
                    f,
                    "  ok    version {} (id {}): auditflow reads it",
                    version.version, version.id
                )?,
                Some(reason) => writeln!(
                    f,
                    "  FAIL  version {} (id {}): cannot be read: {reason}",
                    version.version, version.id
                )?,
            }
        }
        if self.versions.is_empty() {
            writeln!(f, "  the subject has no versions")?;
        }
        Ok(())
    }
}

/// Fetches every version of `subject` and checks each against the reader schema.
pub async fn check(registry: &SchemaRegistry, subject: &str) -> Result<CheckReport, RegistryError> {
    let mut versions = Vec::new();
    for version in registry.subject_versions(subject).await? {
        let registered = registry.subject_version(subject, version).await?;
        let reason = verdict(&registered.as_schema()).err();
        versions.push(VersionVerdict {
            version: registered.version,
            id: registered.id,
            readable: reason.is_none(),
            reason,
        });
    }
    Ok(CheckReport {
        subject: subject.to_owned(),
        registry: registry.urls().to_vec(),
        versions,
    })
}

fn verdict(schema: &RegistrySchema) -> Result<(), String> {
    if let Some(reason) = schema.unsupported() {
        return Err(reason);
    }
    check_resolvable(&schema.schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_lists_every_version_and_why_one_fails() {
        let report = CheckReport {
            subject: "audit-events-value".into(),
            registry: vec!["http://sr:8081".into()],
            versions: vec![
                VersionVerdict {
                    version: 1,
                    id: 12,
                    readable: true,
                    reason: None,
                },
                VersionVerdict {
                    version: 2,
                    id: 40,
                    readable: false,
                    reason: Some("field occurred_at: writer type string cannot be read".into()),
                },
            ],
        };
        assert!(!report.all_readable());
        let text = report.to_string();
        assert!(text.contains("2 version(s), 1 readable, 1 not"), "{text}");
        assert!(text.contains("ok    version 1 (id 12)"), "{text}");
        assert!(
            text.contains("FAIL  version 2 (id 40): cannot be read: field occurred_at"),
            "{text}"
        );
    }

    #[test]
    fn the_embedded_schemas_pass_and_a_changed_field_type_fails() {
        let v1 = crate::ingest::decode::embedded_schema(1).unwrap();
        let v2 = crate::ingest::decode::embedded_schema(2).unwrap();
        let schema = |text: &str| RegistrySchema {
            schema: text.to_owned(),
            schema_type: None,
            references: Vec::new(),
        };
        verdict(&schema(v1)).unwrap();
        verdict(&schema(v2)).unwrap();
        let mut changed: serde_json::Value = serde_json::from_str(v2).unwrap();
        changed["fields"][1]["type"] = "string".into();
        let reason = verdict(&schema(&changed.to_string())).unwrap_err();
        assert!(reason.contains("occurred_at"), "{reason}");
        let protobuf = RegistrySchema {
            schema_type: Some("PROTOBUF".into()),
            ..schema(v2)
        };
        assert!(verdict(&protobuf).unwrap_err().contains("PROTOBUF"));
    }
}
