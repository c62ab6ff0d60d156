//! The Debian packages that the tests, the demo and the benchmarks drive.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::report;
use crate::cmd;
use crate::host::Host;

const STEP: &str = "debian packages";

/// Each package and what it is for; README.md's "Developer setup" lists the
/// same.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "ip netns, veth pairs, routes and rules for the test topologies",
    ),
    ("iperf3", "bulk throughput through the proxy"),
    ("haproxy", "a user-space TCP proxy to compare against"),
    ("socat", "small TCP clients and servers in tests"),
    ("bpftool", "inspecting loaded programs and pinned maps"),
    ("redis-server", "a real upstream service"),
    ("postgresql", "a real upstream service"),
    ("openssh-server", "a real upstream service"),
    ("openssh-client", "a real client for the ssh upstream"),
    ("rsync", "rsync over ssh through `tcpgate connect`"),
    ("git", "git over ssh through `tcpgate connect`"),
    ("curl", "HTTP clients in tests"),
    ("openssl", "test keys and certificates"),
    ("procps", "ps, pgrep and sysctl"),
    ("util-linux", "nsenter, unshare and mount"),
    (
        "libcap2-bin",
        "running the agent with capabilities instead of root",
    ),
    ("nftables", "packet filtering in the test topologies"),
    ("python3", "helper scripts"),
    (
        "python3-venv",
        "the venv moto (the AWS tests' STS) is installed into",
    ),
    ("shellcheck", "checking the operator scripts in scripts/"),
    ("systemd", "systemd-analyze, to verify unit files"),
    ("linux-perf", "perf, for profiling and benchmarks"),
    (
        "etcd-server",
        "the fleet's shared grant store, started by the cluster tests",
    ),
    ("etcd-client", "etcdctl, for inspecting the fleet's keys"),
    (
        "protobuf-compiler",
        "protoc, which the etcd-client crate's build script needs",
    ),
];

/// Without this file, invoke-rc.d would start every daemon we install
/// (PostgreSQL on :5432, sshd...). The tests start their own instances.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

pub fn ensure(host: &Host) -> Result<()> {
    let names: Vec<&str> = PACKAGES.iter().map(|(name, _)| *name).collect();
    let Some(missing) = query_missing(&names)? else {
        report(
            STEP,
            format!(
                "skipped: dpkg-query not found (not Debian?); install these yourself: {}",
                names.join(" ")
            ),
        );
        return Ok(());
    };
    if missing.is_empty() {
        report(STEP, format!("all {} installed", names.len()));
        return Ok(());
    }
    if !host.is_root {
        bail!(
            "these Debian packages are missing: {list}\n\
             installing them needs root; run:\n  \
             sudo apt-get install -y --no-install-recommends {list}",
            list = missing.join(" ")
        );
    }
    report(
        STEP,
        format!("installing {} (daemons are not started)", missing.join(" ")),
    );
    let _no_daemons = NoDaemonStarts::arm()?;
    if !has_package_lists() {
        apt_update()?;
        apt_install(&missing)?;
    } else if let Err(err) = apt_install(&missing) {
        // The usual cause is a stale index pointing at versions the mirror
        // no longer has (404), so refresh once and retry.
        println!("setup: apt-get install failed ({err:#}); refreshing the package index");
        apt_update()?;
        apt_install(&missing)?;
    }
    let still_missing = query_missing(&names)?.unwrap_or_default();
    if !still_missing.is_empty() {
        bail!(
            "apt-get reported success, but these packages are still not installed: {}",
            still_missing.join(" ")
        );
    }
    report(STEP, format!("all {} installed", names.len()));
    Ok(())
}

/// The packages of `names` that are not installed, or None when this is not
/// a dpkg system.
fn query_missing(names: &[&str]) -> Result<Option<Vec<String>>> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(names)
        .output();
    match output {
        // dpkg-query exits 1 when it knows nothing of some package, but
        // still prints the others; the status text is what counts.
        Ok(output) => Ok(Some(missing_packages(
            names,
            &String::from_utf8_lossy(&output.stdout),
        ))),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).context("could not run dpkg-query"),
    }
}

/// Reads `dpkg-query -W -f='${Package} ${Status}\n'` output, whose status is
/// `<want> <flag> <state>`, e.g. `install ok installed` or
/// `deinstall ok config-files`. A package is installed when its state is
/// `installed` for any architecture listed.
pub fn missing_packages(names: &[&str], status_text: &str) -> Vec<String> {
    let installed: Vec<&str> = status_text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            (words.nth(2)? == "installed").then_some(name)
        })
        .collect();
    names
        .iter()
        .filter(|name| !installed.contains(name))
        .map(|name| (*name).to_owned())
        .collect()
}

/// A fresh image often ships with the index removed; installing then fails
/// for every package, so update first instead of after a failure.
fn has_package_lists() -> bool {
    fs::read_dir("/var/lib/apt/lists").is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            // `..._binary-amd64_Packages`, maybe compressed (`.lz4`, `.gz`).
            .any(|entry| entry.file_name().to_string_lossy().contains("_Packages"))
    })
}

fn apt_update() -> Result<()> {
    cmd::run(Command::new("apt-get").args(["update", "-q"]))
}

fn apt_install(packages: &[String]) -> Result<()> {
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages),
    )
}

/// Puts a policy-rc.d that refuses every start in place for the install, and
/// removes it again, unless the machine already has one (then it is theirs).
struct NoDaemonStarts {
    created: bool,
}

impl NoDaemonStarts {
    fn arm() -> Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if path.symlink_metadata().is_ok() {
            return Ok(Self { created: false });
        }
        fs::write(
            path,
            "#!/bin/sh\n# placed by cargo xtask setup while it installs packages\nexit 101\n",
        )
        .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {POLICY_RC_D} executable"))?;
        Ok(Self { created: true })
    }
}

impl Drop for NoDaemonStarts {
    fn drop(&mut self) {
        if self.created
            && let Err(err) = fs::remove_file(POLICY_RC_D)
        {
            eprintln!("setup: could not remove {POLICY_RC_D}: {err}; remove it by hand");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_packages_reads_dpkg_states() {
        let status = "curl install ok installed\n\
                      socat deinstall ok config-files\n\
                      iperf3 hold ok installed\n\
                      bpftool unknown ok not-installed\n";
        let names = ["curl", "socat", "iperf3", "bpftool", "haproxy"];
        assert_eq!(
            missing_packages(&names, status),
            vec!["socat", "bpftool", "haproxy"]
        );
    }

    #[test]
    fn one_installed_architecture_is_enough() {
        let status = "libcap2-bin install ok installed\nlibcap2-bin unknown ok not-installed\n";
        assert!(missing_packages(&["libcap2-bin"], status).is_empty());
    }

    #[test]
    fn readme_explains_every_package() {
        let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = fs::read_to_string(&readme).expect("README.md at the workspace root");
        for (name, _) in PACKAGES {
            assert!(
                readme.contains(&format!("`{name}`")),
                "README.md's Developer setup does not mention `{name}`"
            );
        }
    }
}
