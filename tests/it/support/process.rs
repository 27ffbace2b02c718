//! Finding binaries, bounded process waits, and signals via `kill(1)`.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Find `name` on PATH, or in /usr/sbin, /usr/bin, /sbin, /bin.
///
/// Panics with the command that installs it when missing: tests never
/// skip silently.
pub fn require_binary(name: &str, apt_package: &str) -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let fixed = ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"];
    let candidates = path_dirs
        .into_iter()
        .chain(fixed.iter().map(PathBuf::from))
        .map(|dir| dir.join(name));
    for candidate in candidates {
        if is_executable(&candidate) {
            return candidate;
        }
    }
    panic!(
        "required binary `{name}` not found on PATH or in /usr/sbin, /usr/bin. \
         Install it with `apt-get install -y {apt_package}` (as root), \
         or run `scripts/test`, which installs every tool the tests need."
    );
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Run `cmd` to completion with its stdout and stderr captured, killing it
/// and panicking (with what it printed) if it runs longer than `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let described = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {described}: {e}"));
    let stdout = drain(child.stdout.take().expect("stdout piped"));
    let stderr = drain(child.stderr.take().expect("stderr piped"));
    match wait_timeout(&mut child, timeout) {
        Some(status) => Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        },
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let out = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
            let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!(
                "{described} did not finish within {timeout:?}; killed.\n\
                 --- stdout ---\n{out}\n--- stderr ---\n{err}"
            );
        }
    }
}

fn drain<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Wait for `child` at most `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("try_wait on pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Send `signal` (a name like "TERM", "KILL", "QUIT") to `pid` with
/// `kill(1)`. A negative `pid` names a process group. Errors are ignored:
/// the process may be gone already.
pub fn send_signal(pid: i64, signal: &str) {
    let target = pid.to_string();
    let _ = run_bounded(
        Command::new(kill_binary()).args([format!("-{signal}").as_str(), "--", &target]),
        Duration::from_secs(5),
    );
}

fn kill_binary() -> PathBuf {
    // `/bin/kill` (procps) accepts `-- -PGID`; found via PATH first.
    require_binary("kill", "procps")
}

/// Read a file as text, or say why it could not be read.
pub fn read_text(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
