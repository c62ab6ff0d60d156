//! A fleet of bastions sharing grants and revocations through a real etcd.
//!
//! Each bastion has its own runner, bastion and target namespaces, with the
//! same addresses in each: the runner 198.51.100.2 behind bastion A is the
//! same source address behind bastion B, as for one runner whose traffic
//! an ECMP router or a VRRP failover sends to either bastion. Every bastion
//! namespace reaches etcd over a link of its own, which a test can cut.

//!
//! The shared fleet is in cluster/fleet.rs; TLS to etcd in cluster/tls.rs;
//! `tcpgate grants --cluster` in cluster/cli.rs; the reload after a
//! compaction in cluster/resync.rs.

mod cluster {
    pub mod cli;
    pub mod fleet;
    pub mod resync;
    pub mod tls;
}

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cluster::fleet::{PROPAGATION, SUBJECT, closed_with, ended, fleet, services};
use serde_json::json;
use tcpgate_tests::tokens::{claims_with, unix_now};
use tcpgate_tests::{Agent, require_root};
use tcpgate_tests::{eventually, wait_events};

#[test]
fn a_grant_through_one_bastion_admits_through_another() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_etcd, a, b) = fleet(1)?;
    let _services = services(&b)?;
    ensure!(!b.admits(), "B admitted a runner before any grant");
    let grant = a.fx.grant_from_runner(&a.fx.token(), &[])?;
    let granted = Instant::now();
    eventually(PROPAGATION, "B admits under A's grant", || b.admits())?;
    eprintln!(
        "grant through A admitted through B after {:?}",
        granted.elapsed()
    );
    // B's audit line names B and A's grant.
    let open = &wait_events(&b.fx.agent, "session_open", 1)?[0];
    ensure!(
        open["bastion"] == "bastion-b" && open["grant_id"] == grant.as_str(),
        "{open}"
    );
    let fleet = b.admin_get("/v1/fleet/grants")?;
    let fleet: serde_json::Value = serde_json::from_str(&fleet).context(fleet)?;
    ensure!(
        fleet[0]["id"] == grant.as_str() && fleet[0]["bastion"] == "bastion-a",
        "{fleet}"
    );
    let ready = b.admin_get("/readyz")?;
    ensure!(
        ready.starts_with("ready\n") && ready.contains("cluster bastion-b: connected"),
        "{ready}"
    );
    let metrics = b.admin_get("/metrics")?;
    ensure!(
        metrics.contains("tcpgate_cluster_connected 1")
            && metrics.contains("tcpgate_cluster_records_total{action=\"grant_installed\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn a_grant_given_back_through_one_bastion_ends_on_another() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_etcd, a, b) = fleet(1)?;
    let _services = services(&b)?;
    let grant = a.fx.grant_from_runner(&a.fx.token(), &[])?;
    eventually(PROPAGATION, "B admits under A's grant", || b.admits())?;
    // Given back through A (`DELETE /v1/grants/{id}` with the job's
    // token): B stops admitting too.
    a.give_back(&grant, &a.fx.token())?;
    eventually(PROPAGATION, "B stops admitting a grant given back", || {
        !b.admits()
    })?;
    Ok(())
}

#[test]
fn a_revocation_on_one_bastion_ends_sessions_on_another() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_etcd, a, b) = fleet(1)?;
    let _services = services(&a)?;
    let token = a.fx.token();
    a.fx.grant_from_runner(&token, &[])?;
    let mut session = a.streaming_session()?;
    eventually(PROPAGATION, "B holds A's grant", || {
        b.admin_get("/v1/grants").is_ok_and(|g| g.contains(SUBJECT))
    })?;
    let (status, stdout, stderr) = b.revoke_subject()?;
    ensure!(
        status == 0 && stdout.contains("revoked grant"),
        "revoke on B: {stdout} {stderr}"
    );
    let revoked = Instant::now();
    session.set_read_timeout(Some(PROPAGATION))?;
    ensure!(
        ended(&mut session),
        "A's session outlived the revocation on B"
    );
    eprintln!(
        "revocation on B ended A's session after {:?}",
        revoked.elapsed()
    );
    let closed = &closed_with(&a.fx.agent, "revoked", 1)?[0];
    ensure!(closed["bastion"] == "bastion-a", "{closed}");
    // A refuses the same token from now on.
    let (status, _, stderr) = a.try_grant(&token)?;
    ensure!(
        status != 0 && stderr.contains("revoked"),
        "A granted a revoked token: {stderr}"
    );
    Ok(())
}

#[test]
fn expiry_ends_sessions_on_every_bastion() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_etcd, a, b) = fleet(1)?;
    let (_sa, _sb) = (services(&a)?, services(&b)?);
    let token =
        a.fx.keys
            .rsa
            .sign(&claims_with(&[("exp", json!(unix_now() + 6))]));
    a.fx.grant_from_runner(&token, &[])?;
    eventually(PROPAGATION, "B admits under A's grant", || b.admits())?;
    let mut on_a = a.streaming_session()?;
    let mut on_b = b.streaming_session()?;
    for stream in [&mut on_a, &mut on_b] {
        stream.set_read_timeout(Some(PROPAGATION))?;
        ensure!(ended(stream), "a session outlived its grant");
    }
    closed_with(&a.fx.agent, "grant_expired", 1)?;
    closed_with(&b.fx.agent, "grant_expired", 1)?;
    Ok(())
}

#[test]
fn without_etcd_held_grants_keep_working_and_new_grants_get_503() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (mut etcd, a, b) = fleet(1)?;
    let _services = services(&b)?;
    a.fx.grant_from_runner(&a.fx.token(), &[])?;
    eventually(PROPAGATION, "B admits under A's grant", || b.admits())?;
    etcd.stop_all()?;
    eventually(PROPAGATION, "B notices etcd is gone", || {
        b.admin_get("/readyz")
            .is_ok_and(|r| r.contains("disconnected"))
    })?;
    ensure!(b.admits(), "B stopped admitting a held grant without etcd");
    let (status, _, stderr) = b.try_grant(&b.fx.token())?;
    ensure!(
        status != 0 && stderr.contains("503") && stderr.contains("etcd"),
        "a grant without etcd: {status} {stderr}"
    );
    etcd.start_all()?;
    eventually(PROPAGATION, "B grants again once etcd is back", || {
        b.try_grant(&b.fx.token())
            .is_ok_and(|(status, _, _)| status == 0)
    })?;
    Ok(())
}

#[test]
fn a_bastion_cut_off_applies_missed_revocations_when_it_reconnects() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_etcd, a, b) = fleet(1)?;
    let _services = services(&a)?;
    b.fx.grant_from_runner(&b.fx.token(), &[])?;
    eventually(PROPAGATION, "A admits under B's grant", || a.admits())?;
    let mut session = a.streaming_session()?;
    a.link.cut(&a.fx.topo.bastion)?;
    // Its watch must end (HTTP/2 keepalive notices the cut), or the same
    // connection would carry the revocation once the link is back.
    eventually(PROPAGATION, "A notices it is cut off", || {
        a.admin_get("/readyz")
            .is_ok_and(|r| r.contains("disconnected"))
    })?;
    let (status, stdout, stderr) = b.revoke_subject()?;
    ensure!(status == 0, "revoke on B: {stdout} {stderr}");
    // Cut off, A cannot know yet: its session keeps streaming.
    session.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut more = [0u8; 16 * 1024];
    ensure!(
        session.read_exact(&mut more).is_ok(),
        "A's session stopped streaming before A could hear of the revocation; A's audit: {:?}",
        a.fx.agent.audit_events()?
    );
    a.link.restore(&a.fx.topo.bastion)?;
    let restored = Instant::now();
    session.set_read_timeout(Some(Duration::from_secs(60)))?;
    ensure!(
        ended(&mut session),
        "A's session survived the revocation it missed"
    );
    eprintln!(
        "revocation applied {:?} after A's link came back",
        restored.elapsed()
    );
    closed_with(&a.fx.agent, "revoked", 1)?;
    ensure!(!a.admits(), "A admits a revoked subject");
    Ok(())
}

#[test]
fn losing_one_etcd_member_of_three_changes_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (mut etcd, a, b) = fleet(3)?;
    let _services = services(&b)?;
    // The first member is the first URL each bastion was given.
    etcd.stop_member(0)?;
    a.fx.grant_from_runner(&a.fx.token(), &[])?;
    eventually(PROPAGATION, "B admits under A's grant", || b.admits())?;
    let mut session = b.streaming_session()?;
    let (status, stdout, stderr) = a.revoke_subject()?;
    ensure!(status == 0, "revoke on A: {stdout} {stderr}");
    session.set_read_timeout(Some(PROPAGATION))?;
    ensure!(
        ended(&mut session),
        "B's session outlived the revocation on A"
    );
    closed_with(&b.fx.agent, "revoked", 1)?;
    Ok(())
}

#[test]
fn a_restarted_bastion_has_the_fleets_grants_before_it_is_ready() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (_etcd, mut a, b) = fleet(1)?;
    let _services = services(&a)?;
    b.fx.grant_from_runner(&b.fx.token(), &[])?;
    eventually(PROPAGATION, "A admits under B's grant", || a.admits())?;
    a.fx.agent.stop()?;
    // The same configuration with fresh pins and audit file; the keys,
    // certificates and operator socket stay in the first agent's directory.
    let config = std::fs::read_to_string(a.fx.agent.config_path())?;
    let builder = Agent::builder(&a.fx.topo.bastion)?;
    let config = config
        .replace(
            &a.fx.agent.pin_dir().display().to_string(),
            &builder.pin_dir().display().to_string(),
        )
        .replace(
            &a.fx.agent.audit_path().display().to_string(),
            &builder.audit_path().display().to_string(),
        );
    let restarted = builder.config(config).spawn()?;
    // Ready means loaded: the very first connection is admitted.
    ensure!(
        a.admits(),
        "the restarted bastion did not hold the fleet's grant when ready"
    );
    let open = &wait_events(&restarted, "session_open", 1)?[0];
    ensure!(open["bastion"] == "bastion-a", "{open}");
    drop(restarted);
    Ok(())
}
