//! ChildGuard: exit statuses, logs, signals, termination (no privileges needed).

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use tcpgate_tests::{ChildGuard, ProcessError, Signal};

use crate::not_running;

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn logs_and_exit_status_are_captured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new("sh");
    command.args(["-c", "echo to-stdout; echo to-stderr >&2; exit 3"]);
    let mut child = ChildGuard::spawn_logged(&mut command, dir.path(), "sh").expect("spawn");
    let status = child.wait_timeout(WAIT).expect("wait").expect("exits");
    assert_eq!(status.code(), Some(3));
    assert_eq!(child.stdout(), "to-stdout\n");
    assert_eq!(child.stderr_tail(1), "to-stderr");
    let err = child
        .signal(Signal::SIGTERM)
        .expect_err("reaped pids are not signalled");
    assert!(matches!(err, ProcessError::AlreadyExited { .. }), "{err:?}");
}

#[test]
fn wait_timeout_returns_none_while_running_and_signal_stops_it() {
    let mut child = ChildGuard::new(
        Command::new("sleep").arg("600").spawn().expect("spawn"),
        "sleep",
    );
    assert_eq!(
        child.wait_timeout(Duration::from_millis(50)).expect("wait"),
        None
    );
    child.signal(Signal::SIGUSR1).expect("signal");
    let status = child
        .wait_timeout(WAIT)
        .expect("wait")
        .expect("exits on SIGUSR1");
    assert_eq!(status.signal(), Some(Signal::SIGUSR1 as i32));
}

#[test]
fn drop_terminates_and_reaps() {
    let child = ChildGuard::new(
        Command::new("sleep").arg("600").spawn().expect("spawn"),
        "sleep",
    );
    let pid = child.pid();
    drop(child);
    assert!(not_running(pid), "sleep {pid} stopped by drop");
}

#[test]
fn terminate_escalates_to_sigkill_when_sigterm_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new("sh");
    // Ignored signals stay ignored across exec, so `sleep` ignores SIGTERM;
    // "ready" tells us the trap is in place before we signal.
    command.args(["-c", "trap '' TERM; echo ready; exec sleep 600"]);
    let mut child = ChildGuard::spawn_logged(&mut command, dir.path(), "stubborn").expect("spawn");
    while child.stdout().is_empty() {
        assert_eq!(
            child.wait_timeout(Duration::from_millis(10)).expect("wait"),
            None
        );
    }
    child.set_term_grace(Duration::from_millis(200));
    let status = child.terminate().expect("terminate");
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
}
