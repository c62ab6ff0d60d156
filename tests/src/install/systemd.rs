//! A throwaway systemd, booted as PID 1 of its own pid, mount, cgroup and
//! UTS namespaces inside a test's network namespace, on a copy-on-write
//! overlay of the host's root. It lets a test run the real `cargo xtask
//! install`, then `systemctl start tcpgate`, under the real service manager,
//! with no effect on the host: every write lands in a tmpfs, the host's
//! bpffs stays outside (the unit mounts a private one), and dropping the
//! guard kills the namespace.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

/// Bound on the boot (it takes a few seconds here).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs as PID 1 of the new namespaces; `$1` is an empty host directory.
const BOOT_SCRIPT: &str = r#"#!/bin/sh
set -eu
W=$1
mount --make-rprivate /
# Writes go to a tmpfs over a read-only view of the host's root.
mount -t tmpfs -o mode=0700 tmpfs "$W"
mkdir "$W/upper" "$W/work" "$W/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/upper,workdir=$W/work" "$W/root"
R=$W/root
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
# The host's bpffs stays outside: tcpgate-bpffs.service mounts a private one.
while mountpoint -q "$R/sys/fs/bpf"; do umount "$R/sys/fs/bpf"; done
# Read-only /sys, as container managers do: udev and friends stay idle.
mount -o remount,bind,ro "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755 tmpfs "$R/dev"
for node in null zero full random urandom tty; do
    touch "$R/dev/$node"
    mount --bind "/dev/$node" "$R/dev/$node"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
# Boot into a target that pulls in the basic system only, none of the
# host's enabled daemons.
cat > "$R/etc/systemd/system/tcpgate-test.target" <<EOF
[Unit]
Description=tcpgate install test
Requires=basic.target
After=basic.target
EOF
cd "$R"
mkdir -p oldroot
pivot_root . oldroot
umount -l /oldroot
exec env -i container=tcpgate-test PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=tcpgate-test.target
"#;

pub struct Container {
    /// The `unshare` process; its only child is the container's PID 1.
    launcher: Child,
    pid1: u32,
    cgroup: PathBuf,
    /// Host directory the container's tmpfs is mounted on (in its own
    /// mount namespace only).
    workdir: PathBuf,
    _script: TempDir,
}

impl Container {
    /// Boots systemd in the network namespace at `netns` and waits until it
    /// reports `running`.
    pub fn boot(netns: &Path) -> Result<Self> {
        let id = crate::unique_name("tgsd");
        let script_dir = tempfile::Builder::new().prefix("tg-systemd-").tempdir()?;
        let script = script_dir.path().join("boot.sh");
        crate::write_executable(&script, BOOT_SCRIPT.as_bytes(), 0o700)?;
        let workdir = PathBuf::from(format!("/run/{id}"));
        std::fs::create_dir(&workdir)?;
        // systemd manages a cgroup v2 subtree of its own (the host runs
        // hybrid v1/v2 without systemd); the cgroup namespace roots it there.
        let cgroup = PathBuf::from(format!("/sys/fs/cgroup/unified/{id}"));
        if let Err(e) = std::fs::create_dir(&cgroup) {
            let _ = std::fs::remove_dir(&workdir);
            return Err(e).context("create a cgroup v2 directory for the container");
        }
        let launcher = Command::new("sh")
            .arg("-c")
            .arg(
                "echo $$ > \"$1/cgroup.procs\" && exec nsenter --net=\"$2\" \
                 unshare --pid --mount --cgroup --uts --fork --kill-child \"$3\" \"$4\"",
            )
            .args([OsStr::new("sh"), cgroup.as_os_str(), netns.as_os_str()])
            .args([script.as_os_str(), workdir.as_os_str()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start unshare (util-linux)")?;
        let mut container = Container {
            pid1: 0,
            launcher,
            cgroup,
            workdir,
            _script: script_dir,
        };
        container.pid1 = container.find_pid1()?;
        container.wait_running()?;
        Ok(container)
    }

    fn find_pid1(&mut self) -> Result<u32> {
        let launcher = self.launcher.id();
        crate::eventually(
            BOOT_TIMEOUT,
            "systemd to start",
            || -> Result<Option<u32>> {
                if let Some(status) = self.launcher.try_wait()? {
                    let mut stderr = String::new();
                    if let Some(mut pipe) = self.launcher.stderr.take() {
                        std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
                    }
                    bail!("the container exited at boot ({status}): {stderr}");
                }
                let children =
                    std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
                        .unwrap_or_default();
                if let Some(pid) = children.split_whitespace().next() {
                    let pid: u32 = pid.parse()?;
                    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                    if exe.ends_with("systemd") {
                        return Ok(Some(pid));
                    }
                }
                Ok(None)
            },
        )
    }

    fn wait_running(&self) -> Result<()> {
        let mut state = String::new();
        crate::eventually(
            BOOT_TIMEOUT,
            "the container's systemd running",
            || -> Result<bool> {
                // Empty until the manager answers (`offline` before that).
                let output = self.exec(&["systemctl", "is-system-running"])?;
                state = String::from_utf8_lossy(&output.stdout).trim().to_owned();
                match state.as_str() {
                    "running" => Ok(true),
                    "" | "offline" | "initializing" | "starting" => Ok(false),
                    _ => {
                        let failed = self.exec(&["systemctl", "--failed", "--no-pager"])?;
                        bail!(
                            "the container's systemd is {state:?}, not running:\n{}",
                            String::from_utf8_lossy(&failed.stdout)
                        );
                    }
                }
            },
        )
        .with_context(|| format!("the container's systemd is still {state:?}"))
    }

    /// Runs a command inside the container (its mounts and pids; the
    /// network namespace is the container's too).
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--target={}", self.pid1))
            .args(["--mount", "--pid", "--uts", "--"])
            .args(args);
        command
            .output()
            .with_context(|| format!("nsenter into the container: {command:?}"))
    }

    /// Like [`Container::exec`], failing with the command's output unless it
    /// exits 0; returns stdout.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let output = self.exec(args)?;
        let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        ensure!(
            output.status.success(),
            "`{}` in the container failed ({}):\n{}{}",
            shown.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `path` inside the container, as seen from the host.
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1)).join(path.trim_start_matches('/'))
    }

    /// A unit's property, e.g. `ActiveState`.
    pub fn property(&self, unit: &str, name: &str) -> Result<String> {
        let value = self.run(&["systemctl", "show", "--value", "-p", name, unit])?;
        Ok(value.trim().to_owned())
    }

    /// Waits (bounded) until `done` holds, e.g. after `systemctl reload`,
    /// which returns once ExecReload= has sent SIGUSR2: the unit shows
    /// `reloading` until the successor reports READY=1.
    pub fn wait_until(&self, what: &str, done: impl Fn(&Self) -> Result<bool>) -> Result<()> {
        crate::eventually(Duration::from_secs(30), what, || done(self))
    }

    /// The unit's journal, for failure messages.
    pub fn journal(&self, unit: &str) -> String {
        self.exec(&["journalctl", "--no-pager", "-n", "60", "-u", unit])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Killing PID 1 of a pid namespace kills every process in it; the
        // mount namespace, its overlay, tmpfs and bpffs go with them.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid1 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        remove_cgroup_tree(&self.cgroup);
        let _ = std::fs::remove_dir(&self.workdir);
    }
}

/// Removes a cgroup and the ones systemd made below it, deepest first. A
/// cgroup whose last process just died may stay busy for a moment.
fn remove_cgroup_tree(root: &Path) {
    // Best effort, from a drop: a cgroup still there after the bound is
    // left to the next boot.
    let _ = crate::eventually(Duration::from_secs(10), "cgroup removed", || {
        let mut dirs = vec![root.to_path_buf()];
        let mut index = 0;
        while index < dirs.len() {
            if let Ok(entries) = std::fs::read_dir(&dirs[index]) {
                dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
            index += 1;
        }
        for dir in dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        !root.exists()
    });
}
