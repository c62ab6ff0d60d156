//! `cargo xtask install`: the staged tree, the systemd unit, and the agent
//! running from the staged binary, also as an unprivileged user holding only
//! the capabilities the unit grants.
//!
//! Every test stages into its own temporary --destdir (or --root) and
//! creates users and groups with unique names, so they run in parallel and
//! never touch the host's /usr/local, /etc or tcpgate accounts.

mod common;
mod install_support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use common::auth::{AuthFixture, Launch, authenticate, echo_service, policy};
use common::wait_events;
use install_support::unprivileged::{Wrapper, capability_set, ids};
use install_support::{PREFIX, Staged, TestUser, install, xtask};
use tcpgate_tests::require_root;

/// The capabilities the unit must grant, no more (see the unit's comments
/// for why each is needed; the tests below show it).
const UNIT_CAPABILITIES: [&str; 3] = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"];

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// Every regular file under `dir`, relative to it, as `/path`.
fn files_under(dir: &Path) -> Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path.strip_prefix(dir)?.display().to_string();
                found.insert(format!("/{relative}"));
            }
        }
    }
    Ok(found)
}

fn staged_files() -> Vec<(String, u32)> {
    let mut files: Vec<(String, u32)> = [
        ("/bin/tcpgate", 0o755),
        ("/lib/systemd/system/tcpgate.service", 0o644),
        ("/lib/sysusers.d/tcpgate.conf", 0o644),
        ("/lib/tmpfiles.d/tcpgate.conf", 0o644),
        ("/share/bash-completion/completions/tcpgate", 0o644),
        ("/share/zsh/site-functions/_tcpgate", 0o644),
        ("/share/fish/vendor_completions.d/tcpgate.fish", 0o644),
        ("/share/man/man1/tcpgate.1", 0o644),
        ("/share/man/man1/tcpgate-run.1", 0o644),
        ("/share/man/man1/tcpgate-check-config.1", 0o644),
    ]
    .iter()
    .map(|(path, mode)| (format!("{PREFIX}{path}"), *mode))
    .collect();
    files.push(("/etc/tcpgate/tcpgate.toml".to_owned(), 0o644));
    files
}

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

    let unit = staged.unit()?;
    let service = |key: &str| unit.one("Service", key);
    ensure!(service("Type")? == "notify" && service("NotifyAccess")? == "main");
    ensure!(
        service("ExecStart")? == "/usr/local/bin/tcpgate run --config /etc/tcpgate/tcpgate.toml"
    );
    ensure!(service("ExecReload")? == "/bin/kill -HUP $MAINPID");
    ensure!(service("User")? == "tcpgate" && service("Group")? == "tcpgate");
    ensure!(service("SupplementaryGroups")? == "tcpgate-operators");
    let wanted: BTreeSet<String> = UNIT_CAPABILITIES.map(str::to_owned).into();
    ensure!(
        unit.set("Service", "AmbientCapabilities")? == wanted,
        "ambient capabilities"
    );
    ensure!(
        unit.set("Service", "CapabilityBoundingSet")? == wanted,
        "bounding set"
    );
    for cap in &wanted {
        let known = Command::new("capsh")
            .arg(format!("--supports={}", cap.to_ascii_lowercase()))
            .status()?;
        ensure!(
            known.success(),
            "{cap} is not a capability this kernel knows"
        );
    }
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/sys/fs/bpf/tcpgate"),
        ("LogsDirectory", "tcpgate"),
        ("LogsDirectoryMode", "0750"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0027"),
    ] {
        ensure!(
            service(key)? == value,
            "{key}={}, want {value}",
            service(key)?
        );
    }
    let families: BTreeSet<String> = ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"]
        .map(str::to_owned)
        .into();
    ensure!(unit.set("Service", "RestrictAddressFamilies")? == families);
    ensure!(
        unit.all("Service", "ExecStartPre").contains(
            &"+/usr/bin/install -d -o tcpgate -g tcpgate-operators -m 0750 /sys/fs/bpf/tcpgate"
        ),
        "the unit makes the pin directory as root"
    );
    // Every program the unit runs exists (systemd-analyze verify checks
    // ExecStart only).
    for key in ["ExecStartPre", "ExecStart", "ExecReload"] {
        for line in unit.all("Service", key) {
            let program = line.trim_start_matches(['+', '-', '!', '@', ':']);
            let program = program.split_whitespace().next().unwrap_or_default();
            let on_disk = if program.starts_with(PREFIX) {
                staged.path(program)
            } else {
                program.into()
            };
            ensure!(
                mode(&on_disk)? & 0o111 != 0,
                "{key}: {program} is not executable"
            );
        }
    }
    ensure!(unit.one("Install", "WantedBy")? == "multi-user.target");

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
    let check = Command::new(staged.binary())
        .arg("check-config")
        .arg("--config")
        .arg(&config_path)
        .output()?;
    ensure!(
        check.status.success(),
        "the example config fails check-config: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    check_completions_and_man_pages(&staged)
}

fn check_completions_and_man_pages(staged: &Staged) -> Result<()> {
    let bash = staged.path(&format!(
        "{PREFIX}/share/bash-completion/completions/tcpgate"
    ));
    let registered = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p tcpgate", bash.display()))
        .output()?;
    ensure!(
        String::from_utf8_lossy(&registered.stdout).contains("-F _tcpgate tcpgate"),
        "bash completion registers for tcpgate: {}",
        String::from_utf8_lossy(&registered.stderr)
    );
    let zsh = std::fs::read_to_string(
        staged.path(&format!("{PREFIX}/share/zsh/site-functions/_tcpgate")),
    )?;
    ensure!(zsh.starts_with("#compdef tcpgate"), "zsh completion header");
    let fish = std::fs::read_to_string(staged.path(&format!(
        "{PREFIX}/share/fish/vendor_completions.d/tcpgate.fish"
    )))?;
    ensure!(fish.contains("complete -c tcpgate"), "fish completion");
    for page in ["tcpgate.1", "tcpgate-run.1"] {
        let path = staged.path(&format!("{PREFIX}/share/man/man1/{page}"));
        let rendered = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .output()?;
        let warnings = String::from_utf8_lossy(&rendered.stderr);
        ensure!(
            rendered.status.success() && warnings.trim().is_empty(),
            "man {page}: {warnings}"
        );
        ensure!(String::from_utf8_lossy(&rendered.stdout).contains("SYNOPSIS"));
    }
    Ok(())
}

/// Lines of an install's output that changed something.
fn changes(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter(|l| {
            l.ends_with("... installed") || l.ends_with("... updated") || l.ends_with("... removed")
        })
        .collect()
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
        third.contains("the existing /etc/tcpgate/tcpgate.toml passes"),
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
         exec systemd-analyze verify {PREFIX}/lib/systemd/system/tcpgate.service",
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

/// Sends `payload` through an admitted stream and checks the echo.
fn echo_through(stream: &mut std::net::TcpStream, payload: &[u8]) -> Result<()> {
    stream.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back)?;
    ensure!(back == payload, "echo through the agent");
    Ok(())
}

/// The session went through the kernel splice: every byte counted by the
/// verdict program, none copied by the agent.
fn ensure_spliced(event: &serde_json::Value, len: u64) -> Result<()> {
    ensure!(event["datapath"] == "ebpf", "data path: {event}");
    ensure!(
        event["kernel_bytes_up"] == len && event["kernel_bytes_down"] == len,
        "kernel byte counters: {event}"
    );
    ensure!(
        event["userspace_bytes_up"] == 0 && event["userspace_bytes_down"] == 0,
        "no user-space copy: {event}"
    );
    Ok(())
}

/// The staged binary is a working tcpgate: runner → bastion → target with a
/// token preamble, then with a grant asked for by the staged CLI and a plain
/// client; both sessions spliced in the kernel.
#[test]
fn staged_binary_serves_authenticated_sessions_end_to_end() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let staged = Staged::new()?;
    let launch = Launch {
        binary: Some(staged.binary()),
        prepare: None,
    };
    let fx = AuthFixture::start_launched(&policy("15m"), &[], launch)?;
    ensure!(
        fx.agent.binary() == staged.binary(),
        "the agent is the staged binary"
    );
    let server = echo_service(&fx, b"")?;

    let payload = b"through the staged binary, token in band";
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    let (status, message) = authenticate(&mut stream, &fx.token())?;
    ensure!(status == 0, "preamble denied: {message}");
    echo_through(&mut stream, payload)?;
    drop(stream);

    let grant = fx.grant_from_runner(&fx.token(), &[])?;
    let mut plain = fx.dial_from_runner(AuthFixture::target(9000))?;
    echo_through(&mut plain, payload)?;
    drop(plain);

    let closed = wait_events(&fx.agent, "session_close", 2)?;
    for event in &closed {
        ensure_spliced(event, payload.len() as u64)?;
    }
    ensure!(
        closed.iter().any(|e| e["grant_id"] == grant.as_str()),
        "one session ran under the CLI's grant {grant}: {closed:?}"
    );
    server.stop()?;
    Ok(())
}

/// An echo server on the target's port 22: interception of a low port must
/// not need CAP_NET_BIND_SERVICE (sk_lookup steers it to the agent's 15001).
fn ssh_port_echo(fx: &AuthFixture) -> Result<tcpgate_tests::AcceptLoop<()>> {
    Ok(tcpgate_tests::accept_loop(
        &fx.topo.target,
        AuthFixture::target(22),
        10,
        |mut stream, _| {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        },
    )?)
}

/// The proof that the unit's capability list is enough: the staged agent,
/// started like the unit starts it (an unprivileged user, the operators'
/// group, only the unit's capabilities in every set, no-new-privileges),
/// loads eBPF, installs interception through `ip`, admits a token and
/// splices the session in the kernel; on SIGTERM it removes its routes.
#[test]
fn unit_capabilities_let_a_non_root_agent_intercept_and_splice() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let staged = Staged::new()?;
    let caps = staged.unit()?.capabilities()?;
    let user = TestUser::create()?;
    let wrapper = Wrapper::new(&staged.binary(), &user, &caps)?;
    let mut fx = AuthFixture::start_launched(&policy("15m"), &[], wrapper.launch(&user))?;

    let pid = fx.agent.pid();
    ensure!(
        ids(pid, "Uid")? == vec![user.uid; 4],
        "the agent runs as {}",
        user.name
    );
    ensure!(
        ids(pid, "Groups")?.contains(&user.extra_gid),
        "in the operators' group"
    );
    for field in ["CapEff", "CapPrm", "CapAmb", "CapBnd"] {
        let held = capability_set(pid, field)?;
        ensure!(
            held == caps,
            "{field} is {held:?}, the unit grants {caps:?}"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(status.contains("NoNewPrivs:\t1"), "no-new-privileges");
    ensure!(
        !common::routing_leftovers(&fx.topo.bastion)?.is_empty(),
        "the agent's `ip` child installed the interception rules"
    );

    let server = ssh_port_echo(&fx)?;
    let payload = b"spliced for an unprivileged agent";
    let mut stream = fx.dial_from_runner(AuthFixture::target(22))?;
    let (status, message) = authenticate(&mut stream, &fx.token())?;
    ensure!(
        status == 0,
        "preamble denied: {message}\n{}",
        fx.agent.logs_tail(20)
    );
    echo_through(&mut stream, payload)?;
    drop(stream);
    let closed = wait_events(&fx.agent, "session_close", 1)?;
    ensure_spliced(&closed[0], payload.len() as u64)?;
    ensure!(closed[0]["destination"] == "192.0.2.10:22", "{}", closed[0]);
    server.stop()?;

    let exit = fx.agent.stop()?;
    ensure!(
        exit.success(),
        "clean stop: {exit}\n{}",
        fx.agent.logs_tail(20)
    );
    let left = common::routing_leftovers(&fx.topo.bastion)?;
    ensure!(left.is_empty(), "routes and rules left behind: {left:?}");
    Ok(())
}

/// Each capability of the unit is needed: without any one of them the agent
/// does not start, and says why. Without CAP_PERFMON, the most surprising
/// one, the verifier itself explains.
#[test]
fn dropping_any_unit_capability_stops_startup_with_a_clear_error() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let staged = Staged::new()?;
    let caps = staged.unit()?.capabilities()?;
    let user = TestUser::create()?;
    for dropped in &caps {
        let fewer: BTreeSet<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let wrapper = Wrapper::new(&staged.binary(), &user, &fewer)?;
        let started = AuthFixture::start_launched(&policy("15m"), &[], wrapper.launch(&user));
        let Err(err) = started else {
            anyhow::bail!("the agent started without {dropped}");
        };
        let Some(tcpgate_tests::AgentError::ExitedEarly { stderr_tail, .. }) =
            err.downcast_ref::<tcpgate_tests::AgentError>()
        else {
            anyhow::bail!("without {dropped}: expected an early exit, got {err:#}");
        };
        let expected: &[&str] = match dropped.as_str() {
            // The verifier refuses map-value pointer arithmetic to programs
            // loaded without CAP_PERFMON (which program comes first varies).
            "CAP_PERFMON" => &["prohibited for !root", "Permission denied"],
            "CAP_BPF" | "CAP_NET_ADMIN" => &["failed to create map", "Operation not permitted"],
            other => anyhow::bail!("no expectation for {other}"),
        };
        for text in expected {
            ensure!(
                stderr_tail.contains(text),
                "without {dropped}, the error should say {text:?}:\n{stderr_tail}"
            );
        }
    }
    Ok(())
}
