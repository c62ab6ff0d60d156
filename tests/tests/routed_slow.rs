//! A slow reader behind a routed flow: the bastion forwards packets and
//! never terminates the connection, so TCP's own flow control holds the
//! runner back end to end. Nothing is lost, the kernel's counters match
//! the payload, and the agent holds nothing for the lagging reader.

use std::net::Shutdown;
use std::time::Duration;

use anyhow::{Result, ensure};
use tcpgate_tests::auth_fixture::AuthFixture;
use tcpgate_tests::routed::routed_fixture;
use tcpgate_tests::{
    Payload, SlowReader, read_to_end_hashed, require_root, rss_bytes, serve_once, wait_events,
    write_payload,
};

const MIB: u64 = 1 << 20;

#[test]
fn a_slow_target_holds_the_runner_back_and_nothing_is_lost() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let upload = Payload::new(710, 48 * MIB);
    let server = serve_once(
        &fx.topo.target,
        AuthFixture::target(9000),
        move |stream, _| -> Result<_> {
            let mut slow = SlowReader::new(stream, 64 * 1024, Duration::from_millis(2));
            read_to_end_hashed(&mut slow).map_err(Into::into)
        },
    )?;
    let pid = fx.agent.pid();
    let baseline = rss_bytes(pid)?;
    let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
    write_payload(&mut stream, &upload)?;
    stream.shutdown(Shutdown::Write)?;
    let peak = rss_bytes(pid)?;
    let (len, digest) = server.join()??;
    ensure!(
        len == upload.len && digest == upload.digest(),
        "the slow target got {len} bytes, or others"
    );
    drop(stream);
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["datapath"] == "routed" && closed["kernel_bytes_up"] == upload.len,
        "the tc programs counted the payload: {closed}"
    );
    ensure!(
        peak.saturating_sub(baseline) < 16 * MIB,
        "agent memory grew by {} KiB while the target lagged",
        peak.saturating_sub(baseline) / 1024
    );
    Ok(())
}
