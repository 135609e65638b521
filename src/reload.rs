//! Live configuration: on SIGHUP the environment file named by `AUDITFLOW_CONFIG_FILE` is read
//! again over the process environment, validated as a whole, and what may change live is applied.
//!
//! Live settings: `AUDITFLOW_LOG_LEVEL`, the batch limits (`AUDITFLOW_BATCH_MAX_*`), the breaker
//! thresholds (`AUDITFLOW_BREAKER_*`, `AUDITFLOW_INTERACTIVE_BREAKER_*`) and
//! `AUDITFLOW_REPLAY_RATE`. A reload that fails validation, or that changes anything else
//! (brokers, group, database URL, ...), is rejected whole and the running configuration stays;
//! the rejection names the variables that need a restart, never their values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, ENV_PREFIX};

/// The variable naming the environment file.
pub const CONFIG_FILE_VAR: &str = "AUDITFLOW_CONFIG_FILE";

/// Variables that take effect without a restart.
const LIVE_VARIABLES: &[&str] = &[
    "AUDITFLOW_LOG_LEVEL",
    "AUDITFLOW_BATCH_MAX_EVENTS",
    "AUDITFLOW_BATCH_MAX_BYTES",
    "AUDITFLOW_BATCH_MAX_WAIT_MS",
    "AUDITFLOW_REPLAY_RATE",
];

/// Prefixes of variable families that take effect without a restart.
const LIVE_PREFIXES: &[&str] = &["AUDITFLOW_BREAKER_", "AUDITFLOW_INTERACTIVE_BREAKER_"];

/// True when changing `variable` needs no restart.
pub fn is_live(variable: &str) -> bool {
    LIVE_VARIABLES.contains(&variable)
        || LIVE_PREFIXES
            .iter()
            .any(|prefix| variable.starts_with(prefix))
}

/// One variable that a reload changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The variable.
    pub variable: String,
    /// Its value before (`None`: unset).
    pub old: Option<String>,
    /// Its value after.
    pub new: Option<String>,
}

/// Why a reload was rejected; the running configuration is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The environment file could not be read or parsed. The reason never quotes the file's
    /// content: a line that does not parse may hold a password.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong: a line number and the variable it seems to set, or an I/O error.
        reason: String,
    },
    /// The new configuration is invalid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The reload changes settings that only take effect on a restart.
    #[error("{} cannot change without a restart; reload rejected", .0.join(", "))]
    NeedsRestart(Vec<String>),
}

/// Where the configuration comes from: the process environment at start, overlaid with the
/// environment file.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    base: BTreeMap<String, String>,
    file: Option<PathBuf>,
}

impl ConfigSource {
    /// The process environment and the file it names.
    pub fn from_env() -> Self {
        Self::new(std::env::vars())
    }

    /// `base` variables and the file named there by `AUDITFLOW_CONFIG_FILE`.
    pub fn new(base: impl IntoIterator<Item = (String, String)>) -> Self {
        let base: BTreeMap<String, String> = base.into_iter().collect();
        let file = base
            .get(CONFIG_FILE_VAR)
            .filter(|path| !path.is_empty())
            .map(PathBuf::from);
        ConfigSource { base, file }
    }

    /// The effective `AUDITFLOW_*` variables now.
    pub fn vars(&self) -> Result<BTreeMap<String, String>, ReloadError> {
        let mut vars: BTreeMap<String, String> = self
            .base
            .iter()
            .filter(|(key, _)| key.starts_with(ENV_PREFIX))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        if let Some(path) = &self.file {
            for (key, value) in read_env_file(path)? {
                if key.starts_with(ENV_PREFIX) {
                    vars.insert(key, value);
                }
            }
        }
        Ok(vars)
    }

    /// Loads and validates the configuration, returning the variables it came from.
    pub fn load(&self) -> Result<(Config, BTreeMap<String, String>), ReloadError> {
        let vars = self.vars()?;
        let config = Config::from_vars(vars.clone())?;
        Ok((config, vars))
    }
}

fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, ReloadError> {
    let read_error = |err: dotenvy::Error| ReloadError::Read {
        path: path.to_owned(),
        reason: describe_env_file_error(path, &err),
    };
    dotenvy::from_path_iter(path)
        .map_err(read_error)?
        .map(|item| item.map_err(read_error))
        .collect()
}

/// Describes an environment-file error without the line's content: dotenvy's message repeats
/// the whole line, value included.
fn describe_env_file_error(path: &Path, err: &dotenvy::Error) -> String {
    let dotenvy::Error::LineParse(line, _) = err else {
        return err.to_string();
    };
    let number = std::fs::read_to_string(path).ok().and_then(|text| {
        let first = line.lines().next().unwrap_or_default();
        text.lines().position(|candidate| candidate == first)
    });
    let name = line
        .split_once('=')
        .map(|(name, _)| name.trim().trim_start_matches("export ").trim())
        .filter(|name| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
        });
    let at = match number {
        Some(index) => format!("line {}", index + 1),
        None => "a line".to_owned(),
    };
    match name {
        Some(name) => {
            format!("{at} (setting {name}) does not parse as KEY=VALUE; its content is not shown")
        }
        None => format!("{at} does not parse as KEY=VALUE; its content is not shown"),
    }
}

/// The variables that differ between `old` and `new`, or the ones that need a restart.
pub fn diff(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Result<Vec<Change>, ReloadError> {
    let mut changes = Vec::new();
    for variable in old
        .keys()
        .chain(new.keys().filter(|key| !old.contains_key(*key)))
    {
        let (before, after) = (old.get(variable), new.get(variable));
        if before != after {
            changes.push(Change {
                variable: variable.clone(),
                old: before.cloned(),
                new: after.cloned(),
            });
        }
    }
    let frozen: Vec<String> = changes
        .iter()
        .filter(|change| !is_live(&change.variable) && change.variable != CONFIG_FILE_VAR)
        .map(|change| change.variable.clone())
        .collect();
    if frozen.is_empty() {
        Ok(changes)
    } else {
        Err(ReloadError::NeedsRestart(frozen))
    }
}

type Applier = Box<dyn Fn(&Config) + Send + Sync>;

/// The running configuration and what to tell when it changes.
pub struct LiveConfig {
    source: ConfigSource,
    vars: BTreeMap<String, String>,
    config: Config,
    appliers: Vec<Applier>,
}

impl LiveConfig {
    /// Loads the configuration for the first time.
    pub fn load(source: ConfigSource) -> Result<Self, ReloadError> {
        let (config, vars) = source.load()?;
        Ok(LiveConfig {
            source,
            vars,
            config,
            appliers: Vec::new(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Registers a function that applies the live settings of a new configuration.
    pub fn on_reload(&mut self, apply: impl Fn(&Config) + Send + Sync + 'static) {
        self.appliers.push(Box::new(apply));
    }

    /// Reads the sources again and applies the live changes; on error nothing changes.
    pub fn reload(&mut self) -> Result<Vec<Change>, ReloadError> {
        let (config, vars) = self.source.load()?;
        let changes = diff(&self.vars, &vars)?;
        for apply in &self.appliers {
            apply(&config);
        }
        self.config = config;
        self.vars = vars;
        Ok(changes)
    }

    /// Reloads on every SIGHUP until `shutdown`, logging what changed or why it was rejected.
    pub fn spawn_on_sighup(mut self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut hangups = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(signal) => signal,
                Err(err) => {
                    tracing::error!(error = %err, "cannot listen for SIGHUP; live reload disabled");
                    return;
                }
            };
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    received = hangups.recv() => if received.is_none() { return },
                }
                match self.reload() {
                    Ok(changes) if changes.is_empty() => {
                        tracing::info!("configuration reloaded; nothing changed")
                    }
                    Ok(changes) => {
                        for change in &changes {
                            tracing::info!(
                                variable = %change.variable,
                                old = change.old.as_deref().unwrap_or("(unset)"),
                                new = change.new.as_deref().unwrap_or("(unset)"),
                                "configuration changed"
                            );
                        }
                        tracing::info!(num_changes = changes.len(), "configuration reloaded");
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "configuration reload rejected; keeping the running configuration")
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_malformed_line_is_named_by_number_and_variable_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auditflow.env");
        std::fs::write(
            &path,
            "AUDITFLOW_BATCH_MAX_EVENTS=100\n\
             AUDITFLOW_DATABASE_URL=\"postgres://u:hunter2-secret@db/x\n\
             AUDITFLOW_LOG_LEVEL=info\n",
        )
        .unwrap();
        let source = ConfigSource::new([(CONFIG_FILE_VAR.to_owned(), path.display().to_string())]);
        let err = source.vars().unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("AUDITFLOW_DATABASE_URL"), "{err}");
        std::fs::write(
            &path,
            "AUDITFLOW_LOG_LEVEL=info\nnot a line with s3cret in it\n",
        )
        .unwrap();
        let err = source.vars().unwrap_err().to_string();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn live_settings_are_listed_with_their_old_and_new_values() {
        let old = map(&[
            ("AUDITFLOW_BATCH_MAX_EVENTS", "5000"),
            ("AUDITFLOW_KAFKA_TOPIC", "t"),
        ]);
        let new = map(&[
            ("AUDITFLOW_BATCH_MAX_EVENTS", "100"),
            ("AUDITFLOW_KAFKA_TOPIC", "t"),
            ("AUDITFLOW_BREAKER_OPEN_MS", "900"),
        ]);
        let changes = diff(&old, &new).unwrap();
        assert_eq!(
            changes,
            vec![
                Change {
                    variable: "AUDITFLOW_BATCH_MAX_EVENTS".into(),
                    old: Some("5000".into()),
                    new: Some("100".into())
                },
                Change {
                    variable: "AUDITFLOW_BREAKER_OPEN_MS".into(),
                    old: None,
                    new: Some("900".into())
                },
            ]
        );
    }

    #[test]
    fn settings_that_need_a_restart_reject_the_reload_and_are_named_without_values() {
        let old = map(&[
            ("AUDITFLOW_KAFKA_BROKERS", "a:9092"),
            ("AUDITFLOW_DATABASE_URL", "postgres://u:secret@h/db"),
        ]);
        let new = map(&[
            ("AUDITFLOW_KAFKA_BROKERS", "b:9092"),
            ("AUDITFLOW_DATABASE_URL", "postgres://u:other@h/db"),
            ("AUDITFLOW_LOG_LEVEL", "debug"),
        ]);
        let err = diff(&old, &new).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("AUDITFLOW_KAFKA_BROKERS"), "{message}");
        assert!(message.contains("AUDITFLOW_DATABASE_URL"), "{message}");
        assert!(message.contains("restart"), "{message}");
        assert!(
            !message.contains("secret") && !message.contains("other"),
            "{message}"
        );
    }

    #[test]
    fn a_reload_from_the_file_applies_live_changes_and_rejects_bad_ones_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auditflow.env");
        std::fs::write(&file, "AUDITFLOW_BATCH_MAX_EVENTS=5000\n").unwrap();
        let source = ConfigSource::new([(CONFIG_FILE_VAR.to_string(), file.display().to_string())]);
        let mut live = LiveConfig::load(source).unwrap();
        let applied = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&applied);
        live.on_reload(move |config| seen.lock().unwrap().push(config.batch.batch_max_events));

        std::fs::write(
            &file,
            "AUDITFLOW_BATCH_MAX_EVENTS=250\nAUDITFLOW_LOG_LEVEL=debug\n",
        )
        .unwrap();
        let changes = live.reload().unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(live.config().batch.batch_max_events, 250);

        std::fs::write(&file, "AUDITFLOW_BATCH_MAX_EVENTS=0\n").unwrap();
        let err = live.reload().unwrap_err();
        assert!(
            err.to_string().contains("AUDITFLOW_BATCH_MAX_EVENTS"),
            "{err}"
        );
        assert_eq!(
            live.config().batch.batch_max_events,
            250,
            "the running configuration stays"
        );

        std::fs::write(
            &file,
            "AUDITFLOW_BATCH_MAX_EVENTS=100\nAUDITFLOW_KAFKA_GROUP_ID=other\n",
        )
        .unwrap();
        assert!(
            matches!(live.reload(), Err(ReloadError::NeedsRestart(vars)) if vars == ["AUDITFLOW_KAFKA_GROUP_ID"])
        );
        assert_eq!(
            live.config().batch.batch_max_events,
            250,
            "rejected whole, live part included"
        );
        assert_eq!(*applied.lock().unwrap(), vec![250]);
    }
}
