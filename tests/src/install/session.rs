//! Helpers for sessions through an agent under test.

use std::io::{Read, Write};

use anyhow::{Result, ensure};

/// Sends `payload` through an admitted stream and checks the echo.
pub fn echo_through(stream: &mut std::net::TcpStream, payload: &[u8]) -> Result<()> {
    stream.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back)?;
    ensure!(back == payload, "echo through the agent");
    Ok(())
}

/// The session went through the kernel splice: every byte counted by the
/// verdict program, none copied by the agent.
pub fn ensure_spliced(event: &serde_json::Value, len: u64) -> Result<()> {
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

/// An echo server on the target's port 22.
pub fn echo_on_port_22(topo: &crate::Topology) -> Result<crate::AcceptLoop<()>> {
    Ok(crate::accept_loop(
        &topo.target,
        std::net::SocketAddr::from((crate::topology::TARGET_V4, 22)),
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
