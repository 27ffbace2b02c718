//! fencegate itself: `init` + `run` in a temp dir of its own.

use super::config::FencegateConfig;
use super::http::http_get;
use super::process::{read_text, run_bounded, send_signal, wait_timeout};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const HEALTHY_TIMEOUT: Duration = Duration::from_secs(10);
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
const EXPECT_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to `shutdown_grace` (default 30 s) when waiting for SIGTERM.
const TERM_SLACK: Duration = Duration::from_secs(10);

/// The binary under test: `FENCEGATE_BIN` if set (e.g. a release build),
/// else the one cargo built for this test run.
pub fn binary() -> PathBuf {
    std::env::var_os("FENCEGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fencegate")))
}

/// How a `run` that was expected to fail ended.
#[derive(Debug)]
pub struct RunExit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunExit {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// A fencegate process with its config, state file and captured output in
/// its own temp dir. Dropping it SIGKILLs the process.
pub struct Fencegate {
    dir: TempDir,
    config: FencegateConfig,
    config_path: PathBuf,
    child: Option<Child>,
}

impl Fencegate {
    /// Write the config, `fencegate init`, `fencegate run`, and wait until
    /// `/healthz` answers 200.
    pub fn start(config: FencegateConfig) -> Fencegate {
        let mut fg = Fencegate::init_only(config);
        fg.start_again();
        fg
    }

    /// Write the config and run `fencegate init`, without starting `run`
    /// (start it with [`Fencegate::start_again`]).
    pub fn init_only(config: FencegateConfig) -> Fencegate {
        let fg = Fencegate::prepare(config);
        let out = fg.run_cli(&["init"]);
        assert!(
            out.status.success(),
            "fencegate init --config {} failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- config ---\n{}",
            fg.config_path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            fg.config.to_toml(),
        );
        fg
    }

    /// Write the config only: no `init`, no `run`.
    pub fn prepare(config: FencegateConfig) -> Fencegate {
        let dir = tempfile::Builder::new()
            .prefix("fencegate-it-")
            .tempdir()
            .expect("create fencegate temp dir");
        let mut fg = Fencegate {
            config_path: dir.path().join("fencegate.toml"),
            dir,
            config: config.clone(),
            child: None,
        };
        fg.rewrite_config(config);
        fg
    }

    /// A `run` (without `init`) that must exit by itself within 10 s, e.g.
    /// a missing state file → 74. Panics if it keeps running.
    pub fn spawn_run_expect_exit(config: FencegateConfig) -> RunExit {
        let mut fg = Fencegate::prepare(config);
        fg.run_expect_exit(&[])
    }

    /// Run `fencegate run --config PATH ARGS...` with this instance's
    /// config; it must exit by itself within 10 s. Must be stopped.
    pub fn run_expect_exit(&mut self, args: &[&str]) -> RunExit {
        assert!(self.child.is_none(), "run_expect_exit: fencegate is running");
        let before_out = file_len(&self.stdout_path());
        let before_err = file_len(&self.stderr_path());
        let mut child = self.spawn_run(args);
        let status = match wait_timeout(&mut child, EXPECT_EXIT_TIMEOUT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "fencegate run was expected to exit but still ran after {EXPECT_EXIT_TIMEOUT:?}\n\
                     --- stderr ---\n{}",
                    self.stderr_text()
                );
            }
        };
        RunExit {
            status,
            stdout: read_from(&self.stdout_path(), before_out),
            stderr: read_from(&self.stderr_path(), before_err),
        }
    }

    /// Replace the config file (the process, if running, is not told).
    /// Without a `state_path` the state stays at `DIR/fencegate.redb`.
    pub fn rewrite_config(&mut self, mut config: FencegateConfig) {
        if config.state_path.is_none() {
            config.state_path = Some(self.dir.path().join("fencegate.redb"));
        }
        std::fs::write(&self.config_path, config.to_toml()).expect("write fencegate.toml");
        self.config = config;
    }

    /// [`Fencegate::rewrite_config`] on the listen addresses in use, so
    /// that clients made for this fencegate still reach it after a restart.
    pub fn rewrite_config_on_the_same_ports(&mut self, mut config: FencegateConfig) {
        config.listen = self.config.listen.clone();
        config.admin_listen = self.config.admin_listen.clone();
        self.rewrite_config(config);
    }

    /// Spawn `run` again with the same config (no `init`) and wait until
    /// healthy. Panics if it is already running.
    pub fn start_again(&mut self) {
        self.start_again_with(&[]);
    }

    /// [`Fencegate::start_again`] with extra arguments after `run --config PATH`.
    pub fn start_again_with(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "start_again: fencegate is running");
        self.child = Some(self.spawn_run(args));
        self.wait_healthy();
    }

    fn spawn_run(&self, args: &[&str]) -> Child {
        let out = append(&self.stdout_path());
        let err = append(&self.stderr_path());
        let mut cmd = Command::new(binary());
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary().display()))
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        loop {
            if let Ok(resp) = http_get(&self.config.admin_listen, "/healthz", Duration::from_secs(1)) {
                if resp.status == 200 {
                    return;
                }
            }
            let child = self.child.as_mut().expect("fencegate child");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                panic!(
                    "fencegate run exited during start: {status}\n--- stderr ---\n{}\n--- config ---\n{}",
                    self.stderr_text(),
                    self.config.to_toml()
                );
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "fencegate /healthz on {} did not answer 200 within {HEALTHY_TIMEOUT:?}\n\
                     --- stderr ---\n{}\n--- config ---\n{}",
                    self.config.admin_listen,
                    self.stderr_text(),
                    self.config.to_toml()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and wait. No-op when not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait, bounded by `shutdown_grace` (30 s by default)
    /// plus 10 s; panics (after SIGKILL) if it does not exit by then.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        let bound = self.config.shutdown_grace.unwrap_or(Duration::from_secs(30)) + TERM_SLACK;
        match self.wait_exit(bound) {
            Some(status) => status,
            None => {
                self.kill9();
                panic!(
                    "fencegate did not exit within {bound:?} of SIGTERM\n--- stderr ---\n{}",
                    self.stderr_text()
                );
            }
        }
    }

    /// Sends `signal` ("TERM", "INT", ...) without waiting.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("signal: fencegate is not running");
        send_signal(i64::from(pid), signal);
    }

    /// Waits up to `bound` for the process to exit; `None` if it is still
    /// running then.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("wait_exit: fencegate is not running");
        let status = wait_timeout(child, bound)?;
        self.child = None;
        Some(status)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Run `fencegate ARGS... --config PATH` (e.g. `&["epochs", "--json"]`,
    /// `&["check-config"]`), bounded at 30 s.
    pub fn run_cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary());
        cmd.args(args).arg("--config").arg(&self.config_path);
        run_bounded(&mut cmd, CLI_TIMEOUT)
    }

    /// The durable epochs in the state file, by domain, as
    /// `fencegate epochs --json` prints them (fencegate must be stopped).
    pub fn durable_epochs(&self) -> BTreeMap<String, u64> {
        let out = self.run_cli(&["epochs", "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "fencegate epochs --json: {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let list: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("epochs --json is not JSON ({e}): {stdout}"));
        let list = list
            .as_array()
            .unwrap_or_else(|| panic!("epochs --json is not a list: {stdout}"));
        list.iter()
            .map(|d| {
                let name = d["name"].as_str().unwrap_or_else(|| panic!("no name in {d}"));
                let epoch = d["epoch"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no numeric epoch in {d}"));
                (name.to_string(), epoch)
            })
            .collect()
    }

    /// The durable epoch of `domain` (see [`Fencegate::durable_epochs`]).
    pub fn durable_epoch(&self, domain: &str) -> u64 {
        let epochs = self.durable_epochs();
        *epochs
            .get(domain)
            .unwrap_or_else(|| panic!("no domain `{domain}` in the state file: {epochs:?}"))
    }

    /// Run `fencegate ARGS...` exactly as given (no `--config` added).
    pub fn run_cli_raw(args: &[&str]) -> Output {
        run_bounded(Command::new(binary()).args(args), CLI_TIMEOUT)
    }

    /// "http://LISTEN": the proxy.
    pub fn url(&self) -> String {
        self.config.url()
    }

    /// "127.0.0.1:PORT" of the proxy, for [`super::raw_request`].
    pub fn addr(&self) -> String {
        self.config.listen.clone()
    }

    /// "http://ADMIN_LISTEN"
    pub fn admin_url(&self) -> String {
        self.config.admin_url()
    }

    /// A blocking GET on the admin listener, e.g. `admin_get("/metrics")`.
    pub fn admin_get(&self, path: &str) -> super::RawResponse {
        http_get(&self.config.admin_listen, path, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("GET {}{path}: {e}", self.admin_url()))
    }

    /// Writes sent to the store on pipelined connections so far
    /// (`fencegate_upstream_pipelined_total`): a test of lanes checks that
    /// its writes took one.
    pub fn pipelined_writes(&self) -> u64 {
        self.counter("fencegate_upstream_pipelined_total")
    }

    /// Reads sent to the store on read lanes so far.
    pub fn pipelined_reads(&self) -> u64 {
        self.counter("fencegate_upstream_pipelined_reads_total")
    }

    /// Reads a read lane left unanswered and the pool sent again.
    pub fn pipeline_resent(&self) -> u64 {
        self.counter("fencegate_upstream_pipeline_resent_total")
    }

    /// The value of the unlabelled series `series`.
    fn counter(&self, series: &str) -> u64 {
        let text = self.admin_get("/metrics").body;
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"));
        value.trim().parse::<f64>().expect("a number") as u64
    }

    pub fn config(&self) -> &FencegateConfig {
        &self.config
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn state_path(&self) -> PathBuf {
        self.config.state_path.clone().expect("state path is set")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything every `run` of this instance wrote to stderr.
    pub fn stderr_text(&self) -> String {
        read_text(&self.stderr_path())
    }

    pub fn stdout_text(&self) -> String {
        read_text(&self.stdout_path())
    }

    fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("stdout.log")
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }
}

impl Drop for Fencegate {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn file_len(path: &Path) -> usize {
    std::fs::metadata(path).map(|m| m.len() as usize).unwrap_or(0)
}

/// The text of `path` from byte `offset` on.
fn read_from(path: &Path, offset: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(offset..).unwrap_or_default()).into_owned()
}
