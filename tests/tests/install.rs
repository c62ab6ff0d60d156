//! `cargo xtask install` and `uninstall`: the staged tree, the systemd unit
//! as files (`systemd-analyze verify`), idempotency, and an install into a
//! system image. `install_service.rs` and `install_systemd.rs` run what gets
//! installed.
//!
//! Every test stages into its own temporary --destdir (or --root), so they
//! run in parallel and never touch the host's /usr/local, /etc or accounts.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use tcpgate_tests::install::tree::{
    changes, check_completions_and_man_pages, files_under, mode, staged_files,
};
use tcpgate_tests::install::unit::{check_bpffs_unit, check_service_unit};
use tcpgate_tests::install::{HostOperatorsGroup, PREFIX, Staged, install, xtask};
use tcpgate_tests::require_root;

/// The tree holds exactly the expected files with their modes, the unit says
/// what it must, and the staged example config passes check-config.
#[test]
fn staged_tree_holds_the_files_modes_and_unit_settings() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let staged = Staged::new()?;
    for (path, expected) in staged_files() {
        let actual = mode(&staged.path(&path))?;
        ensure!(
            actual == expected,
            "{path}: mode {actual:o}, want {expected:o}"
        );
    }
    let man1 = format!("{PREFIX}/share/man/man1/");
    for file in files_under(staged.dir.path())? {
        let known = staged_files().iter().any(|(p, _)| *p == file)
            || file
                .strip_prefix(&man1)
                .is_some_and(|page| page.starts_with("tcpgate-") && page.ends_with(".1"));
        ensure!(known, "unexpected file in the staging tree: {file}");
    }
    ensure!(
        !staged.path("/etc/passwd").exists() && !staged.path("/var").exists(),
        "staging creates no accounts or directories"
    );
    ensure!(
        staged
            .output
            .contains("systemd-sysusers /usr/local/lib/sysusers.d/tcpgate.conf"),
        "staging says what a postinst must do:\n{}",
        staged.output
    );
    let agent = tcpgate_tests::agent::agent_binary()?;
    let digest = |path: &Path| -> Result<(u64, tcpgate_tests::Digest)> {
        Ok(tcpgate_tests::read_to_end_hashed(
            &mut std::fs::File::open(path)?,
        )?)
    };
    ensure!(
        digest(&staged.binary())? == digest(&agent)?,
        "the staged binary is the one given"
    );

    check_service_unit(&staged)?;
    check_bpffs_unit(&staged)?;

    // The config and the unit agree on where things are.
    let config_path = staged.path("/etc/tcpgate/tcpgate.toml");
    let config = std::fs::read_to_string(&config_path)?;
    for line in [
        "pin_dir = \"/sys/fs/bpf/tcpgate\"",
        "operator_group = \"tcpgate-operators\"",
        "path = \"/var/log/tcpgate/audit.jsonl\"",
    ] {
        ensure!(
            config.lines().any(|l| l == line),
            "example config lacks `{line}`"
        );
    }
    // check-config resolves the operators' group, which install creates:
    // have it on the host for the check (install_service.rs checks a real
    // install's config as installed).
    let group = HostOperatorsGroup::ensure()?;
    let check = Command::new(staged.binary())
        .arg("check-config")
        .arg("--config")
        .arg(&config_path)
        .output()?;
    drop(group);
    ensure!(
        check.status.success(),
        "the example config fails check-config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    check_completions_and_man_pages(&staged)
}

/// A second install changes nothing, an edited config survives, a page of a
/// verb that no longer exists goes; uninstall removes everything but the
/// config, twice without complaint, and --purge removes the config too.
#[test]
fn install_twice_is_harmless_and_uninstall_keeps_the_config_unless_purged() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let staged = Staged::new()?;
    let first = changes(&staged.output);
    ensure!(
        first.len() >= staged_files().len(),
        "first run installs: {first:?}"
    );

    let again = install(staged.dir.path(), &[])?;
    ensure!(
        changes(&again).is_empty(),
        "a second run changed: {:?}",
        changes(&again)
    );
    ensure!(
        again.contains("/etc/tcpgate/tcpgate.toml ... kept"),
        "the config is reported as kept:\n{again}"
    );

    let config = staged.path("/etc/tcpgate/tcpgate.toml");
    let mut edited = std::fs::read_to_string(&config)?;
    edited.push_str("\n# edited by the operator\n");
    std::fs::write(&config, &edited)?;
    let stale = staged.path(&format!("{PREFIX}/share/man/man1/tcpgate-retired.1"));
    std::fs::write(&stale, ".TH tcpgate-retired 1\n")?;
    let third = install(staged.dir.path(), &[])?;
    ensure!(
        std::fs::read_to_string(&config)? == edited,
        "the edited config is untouched"
    );
    ensure!(
        third.contains("install: /etc/tcpgate/tcpgate.toml passes `tcpgate check-config`"),
        "an existing config is checked:\n{third}"
    );
    ensure!(
        changes(&third)
            == [format!(
                "install: {PREFIX}/share/man/man1/tcpgate-retired.1 ... removed"
            )],
        "only the stale page changed: {:?}",
        changes(&third)
    );

    let destdir = staged.dir.path().as_os_str();
    let removed = xtask(&["uninstall".as_ref(), "--destdir".as_ref(), destdir])?;
    ensure!(
        files_under(staged.dir.path())? == BTreeSet::from(["/etc/tcpgate/tcpgate.toml".to_owned()]),
        "only the config is left: {:?}\n{removed}",
        files_under(staged.dir.path())?
    );
    ensure!(removed.contains("kept /etc/tcpgate"), "{removed}");
    let twice = xtask(&["uninstall".as_ref(), "--destdir".as_ref(), destdir])?;
    ensure!(changes(&twice).is_empty(), "second uninstall: {twice}");
    xtask(&[
        "uninstall".as_ref(),
        "--destdir".as_ref(),
        destdir,
        "--purge".as_ref(),
    ])?;
    ensure!(
        files_under(staged.dir.path())?.is_empty(),
        "--purge leaves nothing"
    );
    Ok(())
}

/// `--root` installs into a system image as a real install would: the
/// accounts land in the image's /etc/passwd and /etc/group, the log
/// directory is 0750 tcpgate:tcpgate there; the host is untouched.
#[test]
fn install_into_an_image_creates_the_accounts_and_the_log_directory() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Other tests add and remove their own users meanwhile: compare only
    // the names install creates.
    let host_accounts = || -> Result<Vec<String>> {
        ["passwd tcpgate", "group tcpgate", "group tcpgate-operators"]
            .iter()
            .map(|query| {
                let output = Command::new("getent").args(query.split(' ')).output()?;
                Ok(String::from_utf8_lossy(&output.stdout).into_owned())
            })
            .collect()
    };
    let _serial = tcpgate_tests::install::real_names_lock();
    let host_before = host_accounts()?;
    let image = tempfile::Builder::new().prefix("tg-image-").tempdir()?;
    let binary = tcpgate_tests::agent::agent_binary()?;
    let args = |verb: &'static str| -> Vec<std::ffi::OsString> {
        vec![verb.into(), "--root".into(), image.path().into()]
    };
    let mut install_args = args("install");
    install_args.extend(["--binary".into(), binary.clone().into_os_string()]);
    let first = xtask(&install_args)?;
    ensure!(
        first.contains("accounts tcpgate, tcpgate-operators ... created"),
        "{first}"
    );

    let passwd = std::fs::read_to_string(image.path().join("etc/passwd"))?;
    let user = passwd
        .lines()
        .find(|l| l.starts_with("tcpgate:"))
        .with_context(|| format!("no tcpgate user in the image:\n{passwd}"))?;
    let fields: Vec<&str> = user.split(':').collect();
    ensure!(
        fields.get(6) == Some(&"/usr/sbin/nologin"),
        "no login shell: {user}"
    );
    let (uid, gid): (u32, u32) = (fields[2].parse()?, fields[3].parse()?);
    ensure!(uid < 1000 && uid > 0, "a system uid: {user}");
    let group = std::fs::read_to_string(image.path().join("etc/group"))?;
    ensure!(
        group.lines().any(|l| l.starts_with("tcpgate-operators:")),
        "{group}"
    );
    let log = image.path().join("var/log/tcpgate");
    let meta = std::fs::metadata(&log)?;
    ensure!(
        meta.is_dir() && meta.mode() & 0o7777 == 0o750 && (meta.uid(), meta.gid()) == (uid, gid),
        "log directory: mode {:o}, owner {}:{}",
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid()
    );

    let second = xtask(&install_args)?;
    ensure!(
        second.contains("accounts tcpgate, tcpgate-operators ... exist"),
        "{second}"
    );
    ensure!(
        changes(&second).is_empty(),
        "second run: {:?}",
        changes(&second)
    );

    let mut purge = args("uninstall");
    purge.push("--purge".into());
    xtask(&purge)?;
    let passwd = std::fs::read_to_string(image.path().join("etc/passwd"))?;
    let group = std::fs::read_to_string(image.path().join("etc/group"))?;
    ensure!(!passwd.contains("tcpgate"), "user removed:\n{passwd}");
    ensure!(!group.contains("tcpgate"), "groups removed:\n{group}");
    ensure!(!log.exists() && !image.path().join("etc/tcpgate").exists());
    ensure!(
        host_accounts()? == host_before,
        "the host's accounts are untouched"
    );
    Ok(())
}

/// `systemd-analyze verify` from Debian's systemd accepts the unit. With no
/// systemd running here, it runs offline against the files: the staged
/// /usr/local is bind-mounted over the host's in a private mount namespace,
/// so ExecStart= and the man pages in Documentation= resolve as installed.
/// verify exits 0 on settings it ignores, so any output is a failure.
#[test]
fn systemd_analyze_verify_accepts_the_unit() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let staged = Staged::new()?;
    let local = staged.path(PREFIX);
    let script = format!(
        "mount --bind {local} {PREFIX} && \
         exec systemd-analyze verify {PREFIX}/lib/systemd/system/tcpgate.service \
         {PREFIX}/lib/systemd/system/tcpgate-bpffs.service",
        local = local.display()
    );
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .context("run unshare (util-linux) and systemd-analyze (systemd)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        output.status
    );

    // The same check fails when the unit is broken, so it is not vacuous.
    let unit_path = staged.path(&format!("{PREFIX}/lib/systemd/system/tcpgate.service"));
    let broken = std::fs::read_to_string(&unit_path)?.replace("Type=notify", "Type=notifi");
    std::fs::write(&unit_path, broken)?;
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()?;
    let said = String::from_utf8_lossy(&output.stderr);
    ensure!(
        said.contains("Failed to parse service type"),
        "broken unit: {said}"
    );
    Ok(())
}
