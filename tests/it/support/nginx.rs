//! nginx as a real WebDAV store, run as the test's own single process.

use super::free_port;
use super::process::{read_text, require_binary, send_signal, wait_timeout};
use std::fs::File;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a test waits for nginx to write access log lines it owes.
const LOG_LAG: Duration = Duration::from_secs(5);

/// One line of the store's access log (in completion order, since nginx
/// runs as a single process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub method: String,
    /// `$uri`: the normalized, percent-decoded path (no query string).
    pub uri: String,
    /// `$http_fencing_token`; `None` when the request had no such header.
    pub token: Option<String>,
    pub status: u16,
    /// `$request_length`: request line, headers and body, in bytes.
    pub request_length: u64,
    /// `$pipe`: the request came pipelined behind another on its
    /// connection.
    pub pipelined: bool,
}

impl LogEntry {
    /// `(method, uri, token)`: what reached the store, for comparing logs.
    pub fn request(&self) -> (String, String, Option<String>) {
        (self.method.clone(), self.uri.clone(), self.token.clone())
    }

    /// "METHOD URI TOKEN" (`-`: no token), for comparing logs as text.
    pub fn line(&self) -> String {
        format!(
            "{} {} {}",
            self.method,
            self.uri,
            self.token.as_deref().unwrap_or("-")
        )
    }
}

/// A running nginx serving WebDAV from `data_dir()` on 127.0.0.1.
/// Dropping it SIGKILLs its process group and waits for it.
pub struct Nginx {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl Nginx {
    /// Start nginx on a free port and wait until it accepts connections.
    /// Panics (with error.log) if it does not within 5 s.
    pub fn start() -> Nginx {
        Nginx::start_with("")
    }

    /// Like [`Nginx::start`], with `http_extra` added to the `http` block
    /// (e.g. `keepalive_requests 3;`).
    pub fn start_with(http_extra: &str) -> Nginx {
        let binary = require_binary("nginx", "nginx");
        let mut last_error = String::new();
        // A port taken between free_port() and nginx's bind: try another.
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("fencegate-nginx-")
                .tempdir()
                .expect("create nginx temp dir");
            let port = free_port();
            write_layout(dir.path(), port, http_extra);
            let mut nginx = Nginx {
                child: Some(spawn(&binary, dir.path())),
                dir,
                port,
            };
            match nginx.wait_listening() {
                Ok(()) => return nginx,
                Err(e) if e.contains("Address already in use") => last_error = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("{last_error}");
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// "127.0.0.1:PORT"
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The WebDAV root: `PUT /a/b` lands in `data_dir()/a/b`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    pub fn error_log(&self) -> String {
        read_text(&self.dir.path().join("error.log"))
    }

    /// The access log, parsed, oldest first.
    pub fn log_entries(&self) -> Vec<LogEntry> {
        let text = std::fs::read_to_string(self.access_log_path()).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| parse_log_line(l).unwrap_or_else(|| panic!("bad access log line: {l:?}")))
            .collect()
    }

    /// The access log once it has at least `n` lines, waiting up to 5 s:
    /// nginx writes a request's line after it has answered, so a client
    /// can see the response before the line exists. Returns whatever is
    /// there at the deadline; the caller's assertion says what is missing.
    pub fn log_entries_at_least(&self, n: usize) -> Vec<LogEntry> {
        let deadline = Instant::now() + LOG_LAG;
        loop {
            let entries = self.log_entries();
            if entries.len() >= n || Instant::now() >= deadline {
                return entries;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The pids of nginx's process group (nginx leads its own group), from
    /// `/proc`. With `master_process off` there is exactly one: a single
    /// event loop answers every request and writes the access log, so the
    /// log is in completion order. Empty once stopped.
    pub fn process_ids(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let group = child.id();
        let mut pids: Vec<u32> = std::fs::read_dir("/proc")
            .expect("read /proc")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| process_group(*pid) == Some(group))
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Stop nginx (SIGTERM, then SIGKILL after 5 s) and wait for it.
    /// Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        send_signal(i64::from(child.id()), "TERM");
        if let Some(status) = wait_timeout(&mut child, STOP_TIMEOUT) {
            return Some(status);
        }
        kill_group(&mut child);
        child.wait().ok()
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = ([127, 0, 0, 1], self.port).into();
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            let child = self.child.as_mut().expect("nginx child");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(self.failure(&format!("nginx exited during start: {status}")));
            }
            if Instant::now() >= deadline {
                let msg = format!("nginx did not listen on {} within {START_TIMEOUT:?}", self.addr());
                return Err(self.failure(&msg));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn failure(&self, what: &str) -> String {
        format!(
            "{what}\n--- {}/error.log ---\n{}\n--- stderr ---\n{}",
            self.dir.path().display(),
            self.error_log(),
            read_text(&self.dir.path().join("nginx.stderr")),
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
            let _ = child.wait();
        }
    }
}

/// The process group of `pid` (field 5 of `/proc/PID/stat`, counted after
/// the command name, which may contain spaces and parentheses); `None`
/// when the process is gone.
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name: state, ppid, pgrp.
    after_name.split_whitespace().nth(2)?.parse().ok()
}

/// SIGKILL the child's process group (it leads its own group).
fn kill_group(child: &mut Child) {
    send_signal(-i64::from(child.id()), "KILL");
    let _ = child.kill();
}

fn spawn(binary: &Path, dir: &Path) -> Child {
    let out = File::create(dir.join("nginx.stdout")).expect("create nginx.stdout");
    let err = File::create(dir.join("nginx.stderr")).expect("create nginx.stderr");
    Command::new(binary)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()))
}

fn write_layout(dir: &Path, port: u16, http_extra: &str) {
    for sub in [
        "data",
        "tmp/client_body",
        "tmp/proxy",
        "tmp/fastcgi",
        "tmp/uwsgi",
        "tmp/scgi",
    ] {
        std::fs::create_dir_all(dir.join(sub)).expect("create nginx dirs");
    }
    std::fs::write(dir.join("nginx.conf"), nginx_conf(dir, port, http_extra)).expect("write nginx.conf");
}

fn nginx_conf(dir: &Path, port: u16, http_extra: &str) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;

    log_format fencing '$request_method $uri $http_fencing_token $status $request_length $pipe';
    access_log {d}/access.log fencing;
    {http_extra}

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        root {d}/data;
        dav_methods PUT DELETE MKCOL COPY MOVE;
        create_full_put_path on;
        dav_access user:rw group:rw all:r;
        client_max_body_size 64m;
        autoindex on;
    }}
}}
"#
    )
}

/// `METHOD URI TOKEN STATUS LENGTH PIPE`; the URI may contain spaces, so
/// the last four fields are taken from the end.
fn parse_log_line(line: &str) -> Option<LogEntry> {
    let (method, rest) = line.split_once(' ')?;
    let mut tail = rest.rsplitn(5, ' ');
    let pipelined = tail.next()? == "p";
    let request_length = tail.next()?.parse().ok()?;
    let status = tail.next()?.parse().ok()?;
    let token = tail.next()?;
    let uri = tail.next()?;
    Some(LogEntry {
        method: method.to_string(),
        uri: uri.to_string(),
        token: (token != "-").then(|| token.to_string()),
        status,
        request_length,
        pipelined,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_log_lines() {
        let e = parse_log_line("PUT /a b/c 42 201 180 p").unwrap();
        assert_eq!(e.method, "PUT");
        assert_eq!(e.uri, "/a b/c");
        assert_eq!(e.token.as_deref(), Some("42"));
        assert_eq!(e.status, 201);
        assert_eq!(e.request_length, 180);
        assert!(e.pipelined);
        let e = parse_log_line("GET / - 200 75 .").unwrap();
        assert_eq!(e.token, None);
        assert!(!e.pipelined);
    }
}
