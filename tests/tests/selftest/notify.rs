//! The sd_notify listener (no privileges needed).

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use tcpgate_tests::{NotifyError, NotifyListener};

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn sees_ready_sent_with_other_assignments_from_a_thread() {
    let listener = NotifyListener::new().expect("listener");
    let path = listener.path().to_owned();
    let sender = std::thread::spawn(move || {
        let socket = UnixDatagram::unbound().expect("socket");
        socket
            .send_to(b"STATUS=loading maps", &path)
            .expect("send status");
        socket
            .send_to(b"STATUS=listening\nREADY=1\nMAINPID=1\n", &path)
            .expect("send ready");
    });
    listener.wait_for("READY=1", WAIT).expect("READY=1 arrives");
    sender.join().expect("sender thread");
    assert_eq!(listener.statuses(), ["loading maps", "listening"]);
    // Already received messages still count for later waits.
    listener
        .wait_for("MAINPID=1", WAIT)
        .expect("MAINPID=1 was received");
}

#[test]
fn sees_ready_sent_by_a_child_process() {
    let listener = NotifyListener::new().expect("listener");
    let address = format!("UNIX-SENDTO:{}", listener.path().display());
    let status = Command::new("sh")
        .args([
            "-c",
            "printf 'READY=1\\nSTATUS=child ready' | socat -u - \"$1\"",
            "sh",
            &address,
        ])
        .stdin(Stdio::null())
        .status()
        .expect("run socat");
    assert!(status.success(), "socat failed: {status}");
    listener.wait_for("READY=1", WAIT).expect("READY=1 arrives");
    assert_eq!(listener.statuses(), ["child ready"]);
}

#[test]
fn waiting_for_something_never_sent_is_an_error_with_statuses() {
    let listener = NotifyListener::new().expect("listener");
    let socket = UnixDatagram::unbound().expect("socket");
    socket
        .send_to(b"STATUS=still starting", listener.path())
        .expect("send");
    let err = listener
        .wait_for("READY=1", Duration::from_millis(200))
        .expect_err("READY=1 was never sent");
    assert!(matches!(err, NotifyError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("still starting"), "{err}");
    // "READY=10" is not "READY=1": assignments match whole.
    socket.send_to(b"READY=10", listener.path()).expect("send");
    assert!(
        listener
            .wait_for("READY=1", Duration::from_millis(200))
            .is_err()
    );
}
