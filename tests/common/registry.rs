//! The real schema registry for the tests: Karapace, started by `../shared/registry/up.sh`
//! (`.ci/run` does it with `REGISTRY_AUTH=1`), which exports
//! `AUDITFLOW_TEST_SCHEMA_REGISTRY_URL`, `AUDITFLOW_TEST_SCHEMA_REGISTRY_AUTH_URL` (basic auth,
//! user `auditflow`, password `s3cret`) and `AUDITFLOW_TEST_REGISTRY_KAFKA_BROKERS` (the broker
//! holding its schemas). Without them the registry tests skip, saying so.
//!
//! Both registries share one `_schemas` topic and elect one primary, so writes may be forwarded
//! to the one requiring auth: registrations here always send the `auditflow` credentials, which
//! a registry without auth ignores. Registry ids start at 1 and are shared by every test, so a
//! test registers filler schemas first and its own variants of v1 and v2 (a namespace of its
//! own: the same binary encoding, a new id), and its ids are never a local file version.
//!
//! [`OwnedRegistry`] is a Karapace of the test's own (its own topic, group and port), for the
//! test that stops the registry and starts it again on the same port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The user and password of the auth registry that may write (see up.sh).
pub const WRITER: (&str, &str) = ("auditflow", "s3cret");

/// `AUDITFLOW_TEST_SCHEMA_REGISTRY_URL`, or `None` after printing why the test skips.
pub fn registry_url(test: &str) -> Option<String> {
    env_or_skip("AUDITFLOW_TEST_SCHEMA_REGISTRY_URL", test)
}

/// `AUDITFLOW_TEST_SCHEMA_REGISTRY_AUTH_URL`, or `None` after printing why the test skips.
pub fn auth_registry_url(test: &str) -> Option<String> {
    env_or_skip("AUDITFLOW_TEST_SCHEMA_REGISTRY_AUTH_URL", test)
}

fn env_or_skip(variable: &str, test: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => Some(value.trim_end_matches('/').to_owned()),
        _ => {
            eprintln!(
                "skipped: {test}: {variable} is not set; start the registry with \
                 `eval \"$(REGISTRY_AUTH=1 ../shared/registry/up.sh)\"` (needs python3.11)"
            );
            None
        }
    }
}

/// The embedded schema `version`, renamed into a namespace of the test's own: the registry
/// gives it an id of its own, and data written with the embedded schema decodes with it.
pub fn unique_schema(version: u32, tag: &str) -> String {
    let text = auditflow::ingest::decode::embedded_schema(version).expect("embedded schema");
    let mut json: serde_json::Value = serde_json::from_str(text).unwrap();
    json["namespace"] = format!("io.auditflow.test.t{tag}").into();
    json.to_string()
}

/// A variant of v2 whose `occurred_at` is a string: no reader can resolve it.
pub fn unresolvable_schema(tag: &str) -> String {
    let mut json: serde_json::Value = serde_json::from_str(&unique_schema(2, tag)).unwrap();
    assert_eq!(json["fields"][1]["name"], "occurred_at");
    json["fields"][1]["type"] = "string".into();
    json.to_string()
}

/// The JSON body of `response`.
pub async fn json_body<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> T {
    let body = response.bytes().await.expect("response body");
    serde_json::from_slice(&body).unwrap_or_else(|err| {
        panic!(
            "not the expected JSON ({err}): {}",
            String::from_utf8_lossy(&body)
        )
    })
}

/// Registers schemas the way a producer's tooling would (plain HTTP, not auditflow's client).
pub struct Registrar {
    http: reqwest::Client,
    url: String,
}

impl Registrar {
    /// For the registry at `url`.
    pub fn new(url: &str) -> Self {
        Self::with_client(url, reqwest::Client::new())
    }

    /// For the registry at `url`, through `http` (e.g. one trusting a test CA).
    pub fn with_client(url: &str, http: reqwest::Client) -> Self {
        Registrar {
            http,
            url: url.to_owned(),
        }
    }

    /// `POST /subjects/{subject}/versions`; returns the id. Retries for a while: a registry
    /// that has just started answers 5xx until it has elected its primary.
    pub async fn register(&self, subject: &str, schema: &str) -> u32 {
        let body = serde_json::json!({ "schema": schema }).to_string();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let answer = self
                .http
                .post(format!("{}/subjects/{subject}/versions", self.url))
                .basic_auth(WRITER.0, Some(WRITER.1))
                .header("Content-Type", "application/vnd.schemaregistry.v1+json")
                .body(body.clone())
                .send()
                .await;
            let failure = match answer {
                Ok(response) if response.status().is_success() => {
                    let body = response.bytes().await.expect("registry answer");
                    let json: serde_json::Value =
                        serde_json::from_slice(&body).expect("registry json");
                    return json["id"].as_u64().expect("id") as u32;
                }
                Ok(response) if response.status().is_server_error() => {
                    format!("HTTP {}", response.status())
                }
                Ok(response) => panic!(
                    "registering under {subject}: HTTP {}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                ),
                Err(err) => err.to_string(),
            };
            assert!(
                tokio::time::Instant::now() < deadline,
                "registering under {subject}: {failure}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Registers `n` unrelated schemas, each new, so that the ids registered after them are
    /// above every id so far (and above any local schema file version). Returns their ids.
    pub async fn fillers(&self, n: usize) -> Vec<u32> {
        let tag = super::suffix();
        let mut ids = Vec::new();
        for index in 0..n {
            let schema = serde_json::json!({
                "type": "record",
                "name": format!("Filler{index}"),
                "namespace": format!("io.auditflow.filler.t{tag}"),
                "fields": [{"name": "n", "type": "long"}],
            });
            ids.push(
                self.register(&format!("filler-{tag}-{index}-value"), &schema.to_string())
                    .await,
            );
        }
        ids
    }

    /// Sets a subject's compatibility level (e.g. `NONE`, so an incompatible version can be
    /// registered, as a team that turned the check off would).
    pub async fn set_compatibility(&self, subject: &str, level: &str) {
        let response = self
            .http
            .put(format!("{}/config/{subject}", self.url))
            .basic_auth(WRITER.0, Some(WRITER.1))
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .body(serde_json::json!({ "compatibility": level }).to_string())
            .send()
            .await
            .expect("set compatibility");
        assert!(response.status().is_success(), "{}", response.status());
    }
}

/// A TCP proxy in front of a registry that records the HTTP request lines it forwards
/// (`GET /schemas/ids/7 HTTP/1.1`), so a test counts what auditflow asked.
pub struct CountingProxy {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Forwards a fresh local port to the registry at `upstream_url` (`http://host:port`).
    pub async fn start(upstream_url: &str) -> Self {
        let upstream = upstream_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let (upstream, log) = (upstream.clone(), Arc::clone(&log));
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(upstream).await {
                        forward(inbound, outbound, log).await;
                    }
                });
            }
        });
        CountingProxy {
            port,
            requests,
            task,
        }
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests forwarded so far whose request line starts with `prefix` (`GET /schemas/ids/7`).
    pub fn count(&self, prefix: &str) -> usize {
        let exact = format!("{prefix} ");
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.starts_with(&exact))
            .count()
    }

    /// Every request line so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(inbound: TcpStream, outbound: TcpStream, log: Arc<Mutex<Vec<String>>>) {
    let (mut client_read, mut client_write) = inbound.into_split();
    let (mut server_read, mut server_write) = outbound.into_split();
    let requests = async move {
        let mut buffer = [0u8; 8192];
        let mut line = Vec::new();
        loop {
            let read = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            for &byte in &buffer[..read] {
                if byte == b'\n' {
                    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                    if ["GET ", "POST ", "PUT ", "DELETE "]
                        .iter()
                        .any(|method| text.starts_with(method))
                    {
                        log.lock().unwrap().push(text);
                    }
                    line.clear();
                } else if line.len() < 4096 {
                    line.push(byte);
                }
            }
            if server_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let responses = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(requests, responses);
}

/// A Karapace of the test's own: its own schemas topic on the registry broker, its own primary
/// election group, on a port it keeps across restarts. Killed (SIGKILL, by pid) when dropped.
pub struct OwnedRegistry {
    port: u16,
    /// The CA (its own certificate) when it serves https.
    tls_ca: Option<Vec<u8>>,
    python: PathBuf,
    karapace_dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnedRegistry {
    /// Starts one and waits until it serves; `None` (after saying why) when the registry
    /// environment of up.sh is not there.
    pub async fn start(test: &str) -> Option<Self> {
        Self::start_with(test, false).await
    }

    /// Like [`OwnedRegistry::start`], serving https with a certificate for localhost and
    /// 127.0.0.1 signed by a CA of the test's own ([`OwnedRegistry::ca_pem`]).
    pub async fn start_tls(test: &str) -> Option<Self> {
        Self::start_with(test, true).await
    }

    async fn start_with(test: &str, tls: bool) -> Option<Self> {
        let brokers = env_or_skip("AUDITFLOW_TEST_REGISTRY_KAFKA_BROKERS", test)?;
        let state = std::env::var_os("AUDITFLOW_REGISTRY_STATE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(|dir| PathBuf::from(dir).join("auditflow-registry"))
            })
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|home| PathBuf::from(home).join(".cache/auditflow-registry"))
            })?;
        let python = state.join("venv/bin/python");
        let karapace_dir = std::env::var_os("AUDITFLOW_TEST_REGISTRY_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/registry"))
            });
        if !python.exists() || !karapace_dir.join("karapace").is_dir() {
            eprintln!(
                "skipped: {test}: no Karapace venv at {} or sources at {} (run up.sh once)",
                python.display(),
                karapace_dir.display()
            );
            return None;
        }
        let tag = super::suffix();
        let topic = format!("_schemas_{tag}");
        create_compacted_topic(&brokers, &topic).await;
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            listener.local_addr().expect("port").port()
        };
        let dir = tempfile::tempdir().expect("registry dir");
        let config_path = dir.path().join("karapace.json");
        let mut config = serde_json::json!({
            "bootstrap_uri": brokers, "host": "127.0.0.1", "port": port,
            "advertised_hostname": "127.0.0.1", "topic_name": topic,
            "group_id": format!("schema-registry-{tag}"), "client_id": format!("sr-{tag}"),
            "replication_factor": 1, "master_eligibility": true, "karapace_rest": false,
            "karapace_registry": true, "compatibility": "BACKWARD", "log_level": "WARNING",
        });
        let mut tls_ca = None;
        if tls {
            // A CA of the test's own signs the registry's certificate (localhost, 127.0.0.1);
            // clients are given the CA.
            let ca = super::servers::TestCa::new("auditflow test registry ca");
            let (cert_path, key_path) = ca.issue(dir.path());
            config["server_tls_certfile"] = cert_path.display().to_string().into();
            config["server_tls_keyfile"] = key_path.display().to_string().into();
            config["advertised_protocol"] = "https".into();
            tls_ca = Some(std::fs::read(&ca.cert_file).expect("read the CA certificate"));
        }
        std::fs::write(&config_path, config.to_string()).expect("write karapace config");
        let mut registry = OwnedRegistry {
            port,
            tls_ca,
            python,
            karapace_dir,
            config_path,
            log_path: dir.path().join("karapace.log"),
            _dir: dir,
            child: None,
        };
        registry.spawn();
        registry.wait_ready(Duration::from_secs(90)).await;
        Some(registry)
    }

    /// Its URL (the same across restarts).
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The certificate to trust for an https registry.
    pub fn ca_pem(&self) -> Option<&[u8]> {
        self.tls_ca.as_deref()
    }

    /// An HTTP client that trusts it.
    pub fn client(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &self.tls_ca {
            builder = builder.tls_certs_merge([reqwest::Certificate::from_pem(pem).expect("ca")]);
        }
        builder.build().expect("http client")
    }

    /// Kills it (SIGKILL, by pid) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, without waiting: it answers 5xx while it reloads.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Waits until `GET /subjects` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        let http = self.client();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(response) = http.get(format!("{}/subjects", self.url())).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "owned registry not ready within {timeout:?}; log: {}",
                std::fs::read_to_string(&self.log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("registry log");
        let child = Command::new(&self.python)
            .args(["-m", "karapace.karapace_all"])
            .arg(&self.config_path)
            .env("PYTHONPATH", &self.karapace_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start karapace");
        self.child = Some(child);
    }
}

impl Drop for OwnedRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn create_compacted_topic(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client for the registry broker");
    let results =
        admin
            .create_topics(
                &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))
                    .set("cleanup.policy", "compact")],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .expect("create the schemas topic");
    for result in results {
        result.expect("schemas topic created");
    }
}
