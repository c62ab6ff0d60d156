//! The Agent guard, driven by a fake agent script (the real agent is tested
//! elsewhere): spawning in the namespace, READY, logs, audit, cleanup.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tcpgate_tests::agent::binary_from;
use tcpgate_tests::bpffs;
use tcpgate_tests::{Agent, AgentError, Netns, read_audit, require_root};

use crate::{not_running, ns_inode};

/// Writes an executable shell script into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    tcpgate_tests::write_executable(&path, format!("#!/bin/sh\n{body}\n").as_bytes(), 0o755)
        .expect("write script");
    path
}

/// Sends sd_notify assignments to $NOTIFY_SOCKET, as the agent does.
const NOTIFY: &str = r#"notify() { printf "$1" | socat -u - "UNIX-SENDTO:$NOTIFY_SOCKET"; }"#;

#[test]
fn missing_binary_names_the_path_and_the_build_command() {
    let err =
        binary_from(Some("/nonexistent/tcpgate".into()), Path::new("/ws")).expect_err("missing");
    let text = err.to_string();
    assert!(
        text.contains("/nonexistent/tcpgate") && text.contains("TCPGATE_BIN"),
        "{text}"
    );
    assert!(text.contains("cargo xtask build"), "{text}");

    let empty = tempfile::tempdir().expect("tempdir");
    let err = binary_from(None, empty.path()).expect_err("no build in an empty workspace");
    let text = err.to_string();
    assert!(
        text.contains("target/debug/tcpgate") && text.contains("cargo xtask build"),
        "{text}"
    );

    // An empty TCPGATE_BIN counts as unset, and an existing file is accepted.
    let fake = script(empty.path(), "tcpgate", "exit 0");
    assert!(binary_from(Some("".into()), empty.path()).is_err());
    assert_eq!(
        binary_from(Some(fake.clone().into()), Path::new("/ws")).expect("exists"),
        fake
    );
}

#[test]
fn read_audit_skips_a_partial_last_line_and_reports_bad_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    assert!(read_audit(&path).expect("missing file is empty").is_empty());
    std::fs::write(&path, "{\"a\":1}\n\n{\"b\":2}\n{\"c\":").expect("write");
    let events = read_audit(&path).expect("parse");
    assert_eq!(
        events,
        [serde_json::json!({"a": 1}), serde_json::json!({"b": 2})]
    );
    std::fs::write(&path, "{\"a\":1}\nnot json\n").expect("write");
    let err = read_audit(&path).expect_err("bad line");
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn builder_writes_config_and_hands_out_unique_paths() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("cfg").expect("netns");
    let config = "[agent]\nname = \"x\"\n";
    let builder = Agent::builder(&ns).expect("builder").config(config);
    let other = Agent::builder(&ns).expect("builder");
    let path = builder.write_config().expect("write config");
    assert_eq!(std::fs::read_to_string(&path).expect("read config"), config);
    let pin_dir = builder.pin_dir().to_string_lossy().into_owned();
    assert!(pin_dir.starts_with("/sys/fs/bpf/tg-test-"), "{pin_dir}");
    assert!(!builder.pin_dir().exists(), "the agent creates the pin dir");
    assert_ne!(builder.pin_dir(), other.pin_dir());
    assert_ne!(builder.audit_path(), other.audit_path());
    assert!(builder.audit_path().starts_with(builder.dir()));

    let err = builder
        .binary("/nonexistent/tcpgate")
        .spawn()
        .expect_err("no such binary");
    assert!(matches!(err, AgentError::BinaryMissing { .. }), "{err:?}");
}

#[test]
fn fake_agent_runs_in_the_namespace_with_host_bpffs_and_is_cleaned_up() {
    if !require_root() {
        return;
    }
    bpffs::ensure_mounted().expect("bpffs");
    let scripts = tempfile::tempdir().expect("tempdir");
    let ns = Netns::new("agt").expect("netns");
    let body = format!(
        r#"{NOTIFY}
echo "args: $*" >&2
echo "netns: $(stat -L -c %i /proc/self/ns/net) fs: $(stat -f -c %T /sys/fs/bpf)" >&2
mkdir -p "$PIN_DIR/sub"
notify 'STATUS=starting'
echo '{{"event":"started"}}' >> "$AUDIT"
trap 'echo "{{\"event\":\"stopped\"}}" >> "$AUDIT"; exit 0' TERM
notify 'STATUS=serving\nREADY=1'
while :; do sleep 0.05; done"#
    );
    let fake = script(scripts.path(), "fake-tcpgate", &body);
    let builder = Agent::builder(&ns).expect("builder");
    let (audit, pins) = (builder.audit_path(), builder.pin_dir().to_owned());
    let mut agent = builder
        .binary(&fake)
        .config(format!("[audit]\npath = {audit:?}\n"))
        .args(["--datapath", "userspace"])
        .env("AUDIT", &audit)
        .env("PIN_DIR", &pins)
        .spawn()
        .expect("fake agent becomes ready");

    let logs = agent.logs();
    let expected_args = format!(
        "args: run --config {} --datapath userspace",
        agent.config_path().display()
    );
    assert!(logs.contains(&expected_args), "{logs}");
    let expected_ns = format!("netns: {} fs: bpf_fs", ns_inode(ns.path()));
    assert!(logs.contains(&expected_ns), "{logs}");
    assert_eq!(agent.notify().statuses(), ["starting", "serving"]);
    assert!(
        pins.join("sub").is_dir(),
        "pin dir made in the host's bpffs"
    );
    assert_eq!(
        agent.audit_events().expect("audit"),
        [serde_json::json!({"event": "started"})]
    );

    let pid = agent.pid();
    agent
        .signal(tcpgate_tests::Signal::SIGTERM)
        .expect("sigterm");
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("wait")
        .expect("exits");
    assert!(status.success(), "{status}");
    let stopped = agent
        .wait_for_audit(|e| e["event"] == "stopped", Duration::from_secs(10))
        .expect("stop event");
    assert_eq!(stopped["event"], "stopped");
    let dir = agent.dir().to_owned();
    drop(agent);
    assert!(not_running(pid));
    assert!(!pins.exists(), "pin dir removed on drop");
    assert!(!dir.exists(), "temp dir removed on drop");
}

#[test]
fn agent_exiting_before_ready_reports_status_and_stderr() {
    if !require_root() {
        return;
    }
    let scripts = tempfile::tempdir().expect("tempdir");
    let ns = Netns::new("bad").expect("netns");
    let body = format!(
        "{NOTIFY}\nnotify 'STATUS=parsing config'\necho 'config error: agent.pin_dir: missing' >&2\nexit 64"
    );
    let fake = script(scripts.path(), "fake-tcpgate", &body);
    let err = Agent::builder(&ns)
        .expect("builder")
        .binary(&fake)
        .spawn()
        .expect_err("exits");
    match &err {
        AgentError::ExitedEarly {
            status,
            statuses,
            stderr_tail,
        } => {
            assert_eq!(status.code(), Some(64));
            assert_eq!(statuses, &["parsing config"]);
            assert!(
                stderr_tail.contains("agent.pin_dir: missing"),
                "{stderr_tail}"
            );
        }
        other => panic!("expected ExitedEarly, got {other:?}"),
    }
    assert!(err.to_string().contains("agent.pin_dir: missing"), "{err}");
}

#[test]
fn agent_never_ready_times_out_and_is_killed() {
    if !require_root() {
        return;
    }
    let scripts = tempfile::tempdir().expect("tempdir");
    let ns = Netns::new("slow").expect("netns");
    let pid_file = scripts.path().join("pid");
    let fake = script(
        scripts.path(),
        "fake-tcpgate",
        "echo $$ > \"$PID_FILE\"\necho stuck >&2\nexec sleep 600",
    );
    let err = Agent::builder(&ns)
        .expect("builder")
        .binary(&fake)
        .env("PID_FILE", &pid_file)
        .ready_timeout(Duration::from_millis(500))
        .spawn()
        .expect_err("never ready");
    assert!(matches!(err, AgentError::NotReady { .. }), "{err:?}");
    assert!(err.to_string().contains("stuck"), "{err}");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(not_running(pid), "the unready agent {pid} was stopped");
}
