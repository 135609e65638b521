//! Test-owned servers with TLS and passwords: a certificate authority made for the test, a
//! PostgreSQL cluster (`initdb` + `postgres`, SSL on, SCRAM passwords over TCP) and a Redis
//! server (`--tls-port`, `--requirepass`), each on a free port of its own, stopped and removed
//! when dropped. They need the PostgreSQL server binaries and `redis-server` on the machine
//! (Debian's packages); [`PgCluster::start`] and [`RedisTls::start`] return `None`, saying why,
//! when they are missing, so the tests skip visibly.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};

/// The password of the test clusters' `postgres` user and of the Redis servers.
pub const PASSWORD: &str = "pl4nted-Secret-pw";

/// A certificate authority and the files it wrote.
pub struct TestCa {
    cert: X509,
    key: PKey<Private>,
    /// Where the CA certificate (PEM) is.
    pub cert_file: PathBuf,
    dir: tempfile::TempDir,
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Self {
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut subject = X509NameBuilder::new().unwrap();
        subject.append_entry_by_text("CN", name).unwrap();
        let subject = subject.build();
        let mut builder = X509::builder().unwrap();
        builder.set_version(2).unwrap();
        builder
            .set_serial_number(&serial().to_asn1_integer().unwrap())
            .unwrap();
        builder.set_subject_name(&subject).unwrap();
        builder.set_issuer_name(&subject).unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&Asn1Time::days_from_now(2).unwrap())
            .unwrap();
        builder
            .append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        builder
            .append_extension(KeyUsage::new().key_cert_sign().crl_sign().build().unwrap())
            .unwrap();
        builder.sign(&key, MessageDigest::sha256()).unwrap();
        let cert = builder.build();
        let dir = tempfile::tempdir().unwrap();
        let cert_file = dir.path().join("ca.pem");
        std::fs::write(&cert_file, cert.to_pem().unwrap()).unwrap();
        TestCa {
            cert,
            key,
            cert_file,
            dir,
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1, written as `cert` and `key` PEM files
    /// into `dir`.
    pub fn issue(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let mut subject = X509NameBuilder::new().unwrap();
        subject.append_entry_by_text("CN", "localhost").unwrap();
        let subject = subject.build();
        let mut builder = X509::builder().unwrap();
        builder.set_version(2).unwrap();
        builder
            .set_serial_number(&serial().to_asn1_integer().unwrap())
            .unwrap();
        builder.set_subject_name(&subject).unwrap();
        builder.set_issuer_name(self.cert.subject_name()).unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&Asn1Time::days_from_now(2).unwrap())
            .unwrap();
        let names = SubjectAlternativeName::new()
            .dns("localhost")
            .ip("127.0.0.1")
            .build(&builder.x509v3_context(Some(&self.cert), None))
            .unwrap();
        builder.append_extension(names).unwrap();
        builder.sign(&self.key, MessageDigest::sha256()).unwrap();
        let cert = builder.build();
        let cert_file = dir.join("server.crt");
        let key_file = dir.join("server.key");
        std::fs::write(&cert_file, cert.to_pem().unwrap()).unwrap();
        std::fs::write(&key_file, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        (cert_file, key_file)
    }

    /// The directory the CA's files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn serial() -> BigNum {
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    serial
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary, as the `postgres` user when we are root (the server refuses root).
fn pg_command(binary: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(binary);
        command
    } else {
        Command::new(binary)
    }
}

fn pg_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin")))
        .filter(|dir| dir.join("initdb").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A PostgreSQL cluster of the test's own: SSL with a certificate from the test's CA, SCRAM
/// password authentication for `postgres` (password [`PASSWORD`]) over TCP.
pub struct PgCluster {
    /// Its port on 127.0.0.1.
    pub port: u16,
    server: Child,
    dir: tempfile::TempDir,
}

impl PgCluster {
    /// Starts a cluster whose certificate `ca` issued; `None` (with the reason) when the
    /// PostgreSQL server binaries are missing.
    pub fn start(ca: &TestCa) -> Result<Self, String> {
        let bin = pg_bin_dir().ok_or("no PostgreSQL server binaries under /usr/lib/postgresql")?;
        let dir = tempfile::Builder::new()
            .prefix("auditflow-pg-")
            .tempdir()
            .map_err(|err| err.to_string())?;
        let data = dir.path().join("data");
        let (cert, key) = ca.issue(dir.path());
        let password_file = dir.path().join("pw");
        std::fs::write(&password_file, PASSWORD).unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .map_err(|err| err.to_string())?;
            assert!(status.success(), "chown the cluster directory");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let initdb = pg_command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", password_file.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|err| err.to_string())?;
        if !initdb.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&initdb.stderr)
            ));
        }
        let port = free_port();
        let server = pg_command(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "ssl=on"])
            .arg("-c")
            .arg(format!("ssl_cert_file={}", cert.display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", key.display()))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| err.to_string())?;
        let cluster = PgCluster { port, server, dir };
        if !wait_for_port(port, Duration::from_secs(30)) {
            return Err("the test cluster did not start listening".into());
        }
        // Listening is not accepting: until recovery ends it answers "the database system is
        // starting up" (slow on a loaded machine).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err("the test cluster did not start accepting connections".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    /// A URL for `postgres` with `password` and the given query string.
    pub fn url(&self, password: &str, query: &str) -> String {
        format!(
            "postgres://postgres:{password}@127.0.0.1:{}/postgres?{query}",
            self.port
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown; the directory goes with the TempDir.
        let _ = Command::new("kill")
            .args(["-INT", &self.server.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.server.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = &self.dir;
    }
}

/// A Redis server of the test's own, TLS only, password [`PASSWORD`].
pub struct RedisTls {
    /// Its TLS port on 127.0.0.1.
    pub port: u16,
    server: Child,
    _dir: tempfile::TempDir,
}

impl RedisTls {
    /// Starts one whose certificate `ca` issued; `Err` with the reason when `redis-server` is
    /// missing or built without TLS.
    pub fn start(ca: &TestCa) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|err| err.to_string())?;
        let (cert, key) = ca.issue(dir.path());
        let port = free_port();
        let server = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&ca.cert_file)
            .args(["--tls-auth-clients", "no"])
            .args(["--requirepass", PASSWORD])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("redis-server: {err}"))?;
        let redis = RedisTls {
            port,
            server,
            _dir: dir,
        };
        if !wait_for_port(port, Duration::from_secs(10)) {
            return Err("redis-server did not listen on its TLS port (built without TLS?)".into());
        }
        Ok(redis)
    }

    /// A `rediss://` URL with `password`.
    pub fn url(&self, password: &str) -> String {
        format!("rediss://:{password}@127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisTls {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
