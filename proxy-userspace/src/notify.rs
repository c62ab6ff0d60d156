//! systemd's readiness protocol (`sd_notify`): one datagram to the socket
//! named by `NOTIFY_SOCKET`. A no-op when the variable is unset.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1\nSTATUS=serving`) to the service manager.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // Abstract socket namespace.
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// Tells the service manager the agent is serving.
pub fn ready(status: &str) {
    if let Err(e) = notify(&format!("READY=1\nSTATUS={status}")) {
        tracing::warn!(error = %e, "could not notify the service manager of readiness");
    }
}

/// Tells the service manager the agent is reloading or stopping.
pub fn status(state: &str) {
    if let Err(e) = notify(state) {
        tracing::debug!(error = %e, "could not notify the service manager");
    }
}
