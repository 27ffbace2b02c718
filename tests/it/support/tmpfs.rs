//! A small tmpfs, to make the state file's disk fill up on demand.

use super::process::run_bounded;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A tmpfs mounted on a temp dir; unmounted on drop. Declare it before the
/// [`super::Fencegate`] that uses it, so it is unmounted after fencegate is
/// gone. Mounting needs root (or CAP_SYS_ADMIN): without it the test fails
/// and says so, it never skips.
pub struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's `size=` option, e.g. `1m`).
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("fencegate-tmpfs-")
            .tempdir()
            .unwrap();
        let mut mount = Command::new("mount");
        mount
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path());
        let out = run_bounded(&mut mount, Duration::from_secs(10));
        assert!(
            out.status.success(),
            "cannot mount a tmpfs on {} (this test needs root or CAP_SYS_ADMIN): {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes a filler file until the file system answers ENOSPC; removing
    /// the file gives the space back.
    pub fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).expect("create filler");
        loop {
            match file.write(&[0xA5; 4096]) {
                Ok(0) => return path,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => return path,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = Command::new("umount").arg(self.path()).status();
        if !umount.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}
