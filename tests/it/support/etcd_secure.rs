//! etcd 3.4 behind TLS (with client certificates) and/or user/password
//! auth, for tests of fencegate's `[etcd.tls]`, `user` and
//! `password_file` options.
//!
//! - [`Pki`]: a throwaway CA, a server certificate for 127.0.0.1/localhost,
//!   a client certificate, and an unrelated second CA, made with
//!   `openssl` in a temp dir. All X.509 v3 with the extensions rustls
//!   insists on (basicConstraints, keyUsage, extendedKeyUsage, SAN).
//! - [`SecureEtcd`]: one [`Etcd`] member started with `--cert-file
//!   --key-file --trusted-ca-file --client-cert-auth` on an `https://`
//!   client URL and/or with auth enabled through `etcdctl` (users `root`,
//!   `fencegate` with read on each election's `P/`, `writer` with
//!   read-write there) and a short simple-token TTL.
//! - [`EtcdTable`]: fencegate's `[etcd]` table (and `[etcd.tls]`) for it.
//!
//! The member's process handling (start, restart, kill, logs) is
//! [`Etcd`]'s; this module only adds flags, probe options and the setup.

use super::etcd::MemberExtras;
use super::process::{require_binary, run_bounded};
use super::Etcd;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tempfile::TempDir;

/// Bound on one `openssl` or `etcdctl` run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// Connect timeout of the clients handed to tests.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The users auth-enabled members get.
pub const ROOT_USER: &str = "root";
/// fencegate's user: read on `P/` of each election, nothing else.
pub const FENCEGATE_USER: &str = "fencegate";
/// The campaigning writers' user: read-write on `P/` of each election.
pub const WRITER_USER: &str = "writer";

/// A throwaway PKI in its own temp dir, made with `/usr/bin/openssl`:
/// PEM files, keys unencrypted (EC P-256, PKCS#8).
pub struct Pki {
    dir: TempDir,
}

/// The extension sections `openssl` applies; `[req]` only keeps `req`
/// from looking for the system's config.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

impl Pki {
    /// Make `ca.pem`, `server.pem`/`server-key.pem` (SAN IP:127.0.0.1,
    /// DNS:localhost; serverAuth), `client.pem`/`client-key.pem`
    /// (clientAuth), all signed by `ca.pem`, and `other-ca.pem`, a CA that
    /// signed nothing here. Panics with openssl's output on a failure, or
    /// with the install command when openssl is missing.
    pub fn generate() -> Pki {
        let openssl = require_binary("openssl", "openssl");
        let dir = tempfile::Builder::new()
            .prefix("fencegate-pki-")
            .tempdir()
            .expect("create PKI temp dir");
        let pki = Pki { dir };
        let cnf = pki.path("openssl.cnf");
        std::fs::write(&cnf, OPENSSL_CNF).expect("write openssl.cnf");

        for (name, cn) in [
            ("ca", "fencegate test CA"),
            ("other-ca", "fencegate unrelated CA"),
        ] {
            let key = pki.path(&format!("{name}-key.pem"));
            let cert = pki.path(&format!("{name}.pem"));
            openssl_run(
                &openssl,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                ],
                &[&format!("/CN={cn}")],
                &[("-keyout", &key), ("-out", &cert), ("-config", &cnf)],
                &["-extensions", "ca_ext"],
            );
        }
        let mut serial = 1000;
        for (name, ext) in [("server", "server_ext"), ("client", "client_ext")] {
            serial += 1;
            let key = pki.path(&format!("{name}-key.pem"));
            let csr = pki.path(&format!("{name}.csr"));
            let cert = pki.path(&format!("{name}.pem"));
            openssl_run(
                &openssl,
                &[
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-subj",
                ],
                &[&format!("/CN=fencegate-test-{name}")],
                &[("-keyout", &key), ("-out", &csr), ("-config", &cnf)],
                &[],
            );
            openssl_run(
                &openssl,
                &["x509", "-req", "-days", "2", "-set_serial"],
                &[&serial.to_string()],
                &[
                    ("-in", &csr),
                    ("-CA", &pki.ca_file()),
                    ("-CAkey", &pki.path("ca-key.pem")),
                    ("-out", &cert),
                    ("-extfile", &cnf),
                ],
                &["-extensions", ext],
            );
        }
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA that signed the server and client certificates.
    pub fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A CA that signed neither: verifying etcd with it must fail.
    pub fn other_ca_file(&self) -> PathBuf {
        self.path("other-ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.path("server-key.pem")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.path("client-key.pem")
    }

    /// etcd-client TLS options: trust `ca.pem`, present the client
    /// certificate.
    pub fn tls_options(&self) -> TlsOptions {
        let read = |p: PathBuf| std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(self.ca_file())))
            .identity(Identity::from_pem(
                read(self.client_cert()),
                read(self.client_key()),
            ))
    }
}

/// `openssl FIXED... VALUES... (FLAG PATH)... TAIL...`, bounded; panics
/// with its output unless it exits 0.
fn openssl_run(openssl: &Path, fixed: &[&str], values: &[&str], paths: &[(&str, &Path)], tail: &[&str]) {
    let mut cmd = Command::new(openssl);
    cmd.args(fixed).args(values);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    cmd.args(tail).env_remove("OPENSSL_CONF");
    let out = run_bounded(&mut cmd, TOOL_TIMEOUT);
    assert!(out.status.success(), "{cmd:?} failed: {}", output_text(&out));
}

fn output_text(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What [`SecureEtcd`] enables.
#[derive(Debug, Clone, Default)]
pub struct SecureEtcdBuilder {
    tls: bool,
    auth: Option<AuthSpec>,
}

#[derive(Debug, Clone)]
struct AuthSpec {
    elections: Vec<String>,
    token_ttl_secs: u32,
}

impl SecureEtcdBuilder {
    /// TLS on the client URL, client certificates required.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Auth enabled (simple tokens living `token_ttl_secs` after their last
    /// use); `fencegate` may read, `writer` read and write, under `P/` for
    /// each `P` in `elections`.
    pub fn auth(mut self, elections: &[&str], token_ttl_secs: u32) -> Self {
        self.auth = Some(AuthSpec {
            elections: elections.iter().map(|e| e.to_string()).collect(),
            token_ttl_secs,
        });
        self
    }

    /// Start the member (≤ 10 s) and, with auth, set up users and roles
    /// and enable auth with `etcdctl`.
    pub fn start(self) -> SecureEtcd {
        let pki = self.tls.then(Pki::generate);
        let dir = tempfile::Builder::new()
            .prefix("fencegate-etcd-secure-")
            .tempdir()
            .expect("create secure etcd temp dir");
        let mut extras = MemberExtras::default();
        if let Some(pki) = &pki {
            extras.https = true;
            extras.args.extend(flag_args(&[
                ("--cert-file", &pki.server_cert()),
                ("--key-file", &pki.server_key()),
                ("--trusted-ca-file", &pki.ca_file()),
            ]));
            extras.args.push("--client-cert-auth".to_string());
            extras.probe_options = ConnectOptions::new().with_tls(pki.tls_options());
        }
        if let Some(auth) = &self.auth {
            extras.args.extend([
                "--auth-token".to_string(),
                "simple".to_string(),
                "--auth-token-ttl".to_string(),
                auth.token_ttl_secs.to_string(),
            ]);
        }
        let etcd = Etcd::start_with(extras);
        let tag = etcd.client_port();
        let mut secure = SecureEtcd {
            etcd,
            pki,
            passwords: self.auth.as_ref().map(|_| Passwords {
                root: format!("root-pw-{tag}"),
                fencegate: format!("fencegate-pw-{tag}"),
                writer: format!("writer-pw-{tag}"),
            }),
            token_ttl_secs: self.auth.as_ref().map(|a| a.token_ttl_secs),
            dir,
        };
        if let Some(auth) = &self.auth {
            secure.enable_auth(&auth.elections);
        }
        secure
    }
}

fn flag_args(pairs: &[(&str, &Path)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.to_string_lossy().into_owned()])
        .collect()
}

#[derive(Debug, Clone)]
struct Passwords {
    root: String,
    fencegate: String,
    writer: String,
}

/// One etcd member with TLS and/or auth. Dropping it kills the member.
pub struct SecureEtcd {
    // Declared first: the member dies before the certificate files go.
    etcd: Etcd,
    pki: Option<Pki>,
    passwords: Option<Passwords>,
    token_ttl_secs: Option<u32>,
    /// Password files.
    dir: TempDir,
}

impl SecureEtcd {
    pub fn builder() -> SecureEtcdBuilder {
        SecureEtcdBuilder::default()
    }

    fn enable_auth(&mut self, elections: &[String]) {
        let p = self.passwords.clone().expect("auth passwords");
        let steps: Vec<Vec<String>> = {
            let mut s = vec![
                args(&["user", "add", &format!("{ROOT_USER}:{}", p.root)]),
                args(&["user", "grant-role", ROOT_USER, "root"]),
                args(&["user", "add", &format!("{FENCEGATE_USER}:{}", p.fencegate)]),
                args(&["user", "add", &format!("{WRITER_USER}:{}", p.writer)]),
                args(&["role", "add", "fencegate-reader"]),
                args(&["role", "add", "election-writer"]),
            ];
            for election in elections {
                let under = format!("{election}/");
                s.push(args(&[
                    "role",
                    "grant-permission",
                    "fencegate-reader",
                    "--prefix=true",
                    "read",
                    &under,
                ]));
                s.push(args(&[
                    "role",
                    "grant-permission",
                    "election-writer",
                    "--prefix=true",
                    "readwrite",
                    &under,
                ]));
            }
            s.push(args(&["user", "grant-role", FENCEGATE_USER, "fencegate-reader"]));
            s.push(args(&["user", "grant-role", WRITER_USER, "election-writer"]));
            s.push(args(&["auth", "enable"]));
            s
        };
        for step in steps {
            let step: Vec<&str> = step.iter().map(String::as_str).collect();
            self.etcdctl_ok(None, &step);
        }
        // From now on only an authenticated get proves the member healthy.
        let probe = self.connect_options(Some((ROOT_USER, &p.root)));
        self.etcd.set_probe_options(probe);
        // Nothing works without a user now: auth really is on.
        let anonymous = self.etcdctl(None, &["get", "fencegate-test-probe"]);
        assert!(
            !anonymous.status.success(),
            "a get without a user succeeded after `auth enable`: {}",
            output_text(&anonymous)
        );
    }

    /// `https://127.0.0.1:PORT` with TLS, else `http://`.
    pub fn endpoint(&self) -> String {
        self.etcd.endpoint()
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.etcd.endpoints()
    }

    /// The certificates. Panics when this member has no TLS.
    pub fn pki(&self) -> &Pki {
        self.pki.as_ref().expect("this etcd has no TLS")
    }

    pub fn has_tls(&self) -> bool {
        self.pki.is_some()
    }

    fn passwords(&self) -> &Passwords {
        self.passwords.as_ref().expect("this etcd has no auth")
    }

    pub fn root_password(&self) -> &str {
        &self.passwords().root
    }

    pub fn fencegate_password(&self) -> &str {
        &self.passwords().fencegate
    }

    pub fn writer_password(&self) -> &str {
        &self.passwords().writer
    }

    /// The simple-token TTL the member runs with (auth only).
    pub fn token_ttl(&self) -> Option<Duration> {
        self.token_ttl_secs.map(|s| Duration::from_secs(u64::from(s)))
    }

    /// A file holding `password` and a trailing newline (SPEC: the
    /// content minus trailing newline is the password).
    pub fn password_file(&self, name: &str, password: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{password}\n")).expect("write password file");
        path
    }

    /// `fencegate.password`: the `fencegate` user's password.
    pub fn fencegate_password_file(&self) -> PathBuf {
        let password = self.fencegate_password().to_string();
        self.password_file("fencegate.password", &password)
    }

    /// Connect options with this member's TLS (CA and client certificate)
    /// and, if given, credentials with automatic token refresh. No request
    /// timeout: safe for campaigns.
    pub fn connect_options(&self, user: Option<(&str, &str)>) -> ConnectOptions {
        let mut options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
        if let Some(pki) = &self.pki {
            options = options.with_tls(pki.tls_options());
        }
        if let Some((name, password)) = user {
            options = options.with_user(name, password).with_auto_token_refresh(true);
        }
        options
    }

    async fn connect(&self, user: Option<(&str, &str)>) -> Client {
        let endpoints = self.endpoints();
        Client::connect(&endpoints, Some(self.connect_options(user)))
            .await
            .unwrap_or_else(|e| panic!("etcd client for {endpoints:?} as {user:?}: {e}"))
    }

    /// A client for campaigning writers: TLS if on, `writer`'s
    /// credentials if auth is on.
    pub async fn writer_client(&self) -> Client {
        match &self.passwords {
            Some(p) => self.connect(Some((WRITER_USER, &p.writer))).await,
            None => self.connect(None).await,
        }
    }

    /// A client as `fencegate` (read-only on the elections).
    pub async fn fencegate_client(&self) -> Client {
        self.connect(Some((FENCEGATE_USER, self.fencegate_password())))
            .await
    }

    /// A client as `root` (with auth), or without a user.
    pub async fn root_client(&self) -> Client {
        match &self.passwords {
            Some(p) => self.connect(Some((ROOT_USER, &p.root))).await,
            None => self.connect(None).await,
        }
    }

    /// Run `etcdctl` against this member with its TLS flags, as
    /// `user:password` if given; bounded at 20 s.
    pub fn etcdctl(&self, user: Option<(&str, &str)>, args: &[&str]) -> Output {
        let binary = require_binary("etcdctl", "etcd-client");
        let mut cmd = Command::new(binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCDCTL") {
                cmd.env_remove(key);
            }
        }
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(["--dial-timeout", "3s", "--command-timeout", "5s"]);
        if let Some(pki) = &self.pki {
            cmd.args(flag_args(&[
                ("--cacert", &pki.ca_file()),
                ("--cert", &pki.client_cert()),
                ("--key", &pki.client_key()),
            ]));
        }
        if let Some((name, password)) = user {
            cmd.arg("--user").arg(format!("{name}:{password}"));
        }
        cmd.args(args);
        run_bounded(&mut cmd, TOOL_TIMEOUT)
    }

    /// [`SecureEtcd::etcdctl`] as root (when auth is on), panicking unless
    /// it exits 0; its stdout.
    pub fn etcdctl_root(&self, args: &[&str]) -> String {
        let root = self.passwords.as_ref().map(|p| (ROOT_USER, p.root.as_str()));
        self.etcdctl_ok(root, args)
    }

    fn etcdctl_ok(&self, user: Option<(&str, &str)>, args: &[&str]) -> String {
        let out = self.etcdctl(user, args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} against {}: {}\n--- etcd log ---\n{}",
            self.endpoint(),
            output_text(&out),
            tail(&self.log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The member's zap log.
    pub fn log(&self) -> String {
        self.etcd.log()
    }

    /// How many simple tokens of `user` etcd has dropped so far (expired,
    /// or replaced): its log says "deleted a simple token" for each.
    pub fn deleted_tokens(&self, user: &str) -> usize {
        let needle = format!("\"user-name\":\"{user}\"");
        self.log()
            .lines()
            .filter(|l| l.contains("deleted a simple token") && l.contains(&needle))
            .count()
    }

    /// How many failed authentications etcd logged for `user`.
    pub fn failed_authentications(&self, user: &str) -> usize {
        let needle = format!("\"user\":\"{user}\"");
        self.log()
            .lines()
            .filter(|l| l.contains("invalid authentication was requested") && l.contains(&needle))
            .count()
    }

    /// Restart the member with the same data, flags and certificates.
    /// Simple tokens live in memory only: every token is invalid after.
    pub fn restart(&mut self) {
        self.etcd.restart();
    }

    pub fn kill(&mut self) {
        self.etcd.kill();
    }

    /// fencegate's `[etcd]` table for this member: endpoints, `fencegate`'s
    /// user and password file (with auth), and `[etcd.tls]` with the CA
    /// and the client certificate (with TLS).
    pub fn etcd_table(&self) -> EtcdTable {
        let mut table = EtcdTable::new(&self.endpoints());
        if self.passwords.is_some() {
            table.user = Some(FENCEGATE_USER.to_string());
            table.password_file = Some(self.fencegate_password_file());
        }
        if let Some(pki) = &self.pki {
            table.tls = true;
            table.ca_file = Some(pki.ca_file());
            table.cert_file = Some(pki.client_cert());
            table.key_file = Some(pki.client_key());
        }
        table
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// fencegate's `[etcd]` table with its `[etcd.tls]` sub-table, for
/// [`super::FencegateConfig::etcd_raw`]. Every field is written only when
/// set; `extra` lines go into `[etcd]` as they are.
#[derive(Debug, Clone, Default)]
pub struct EtcdTable {
    pub endpoints: Vec<String>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Raw `key = value` lines for `[etcd]`, e.g. `max_staleness = "3s"`.
    pub extra: Vec<String>,
    /// Write an `[etcd.tls]` table (even an empty one).
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

impl EtcdTable {
    pub fn new(endpoints: &[String]) -> EtcdTable {
        EtcdTable {
            endpoints: endpoints.to_vec(),
            ..EtcdTable::default()
        }
    }

    /// Add a raw `key = value` line to `[etcd]`.
    pub fn with(mut self, line: &str) -> Self {
        self.extra.push(line.to_string());
        self
    }

    /// The body for `etcd_raw`: `[etcd]`'s keys, then `[etcd.tls]`.
    pub fn render(&self) -> String {
        let mut t = String::new();
        let list = self.endpoints.iter().map(|e| toml_str(e)).collect::<Vec<_>>();
        t.push_str(&format!("endpoints = [{}]\n", list.join(", ")));
        if let Some(user) = &self.user {
            t.push_str(&format!("user = {}\n", toml_str(user)));
        }
        if let Some(file) = &self.password_file {
            t.push_str(&format!("password_file = {}\n", toml_path(file)));
        }
        for line in &self.extra {
            t.push_str(line);
            t.push('\n');
        }
        if self.tls {
            t.push_str("\n[etcd.tls]\n");
            for (key, path) in [
                ("ca_file", &self.ca_file),
                ("cert_file", &self.cert_file),
                ("key_file", &self.key_file),
            ] {
                if let Some(path) = path {
                    t.push_str(&format!("{key} = {}\n", toml_path(path)));
                }
            }
            if let Some(name) = &self.server_name {
                t.push_str(&format!("server_name = {}\n", toml_str(name)));
            }
        }
        t
    }
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

/// A TOML basic string (paths here are plain temp paths).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
