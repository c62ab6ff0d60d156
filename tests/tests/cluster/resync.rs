//! A bastion that was cut off while the fleet's records changed and etcd
//! compacted them: its watch cannot resume from the revision it had, so it
//! reloads everything when it reconnects. The revocation it missed is
//! applied, the grant given back elsewhere is gone, and the resync counts.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tcpgate_tests::tokens::claims_with;
use tcpgate_tests::{eventually, require_root};

use super::fleet::{PROPAGATION, SUBJECT, closed_with, ended, fleet, services};

/// Another job's subject (another ref), with a token id of its own.
const OTHER_REF: &str = "release/2.0";

const RESYNCS: &str = "tcpgate_cluster_resyncs_total";

#[test]
fn a_bastion_back_after_a_compaction_reloads_the_fleet() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (etcd, a, b) = fleet(1)?;
    let _services = services(&a)?;
    // Two grants through B, both held by A: one revoked and one given
    // back while A is away.
    b.fx.grant_from_runner(&b.fx.token(), &[])?;
    eventually(PROPAGATION, "A admits under B's grant", || a.admits())?;
    let mut session = a.streaming_session()?;
    let other_subject = format!("project_path:group/app:ref_type:branch:ref:{OTHER_REF}");
    let other_token = b.fx.keys.rsa.sign(&claims_with(&[
        ("ref", json!(OTHER_REF)),
        ("sub", json!(other_subject)),
        ("jti", json!("0b5e6a52-given-back")),
    ]));
    let other = b.fx.grant_from_runner(&other_token, &[])?;
    eventually(PROPAGATION, "A holds both of B's grants", || {
        a.admin_get("/v1/grants")
            .is_ok_and(|g| g.contains(SUBJECT) && g.contains(&other))
    })?;
    let resyncs = a.metric(RESYNCS)?;

    a.link.cut(&a.fx.topo.bastion)?;
    // Its watch must end (HTTP/2 keepalive notices the cut), or the same
    // connection would carry the events once the link is back.
    eventually(PROPAGATION, "A notices it is cut off", || {
        a.admin_get("/readyz")
            .is_ok_and(|r| r.contains("disconnected"))
    })?;
    let (status, stdout, stderr) = b.revoke_subject()?;
    ensure!(status == 0, "revoke on B: {stdout} {stderr}");
    b.give_back(&other, &other_token)?;
    // Everything A missed is compacted away.
    let revision = current_revision(&etcd)?;
    etcd.ctl(&["compact", &revision.to_string()])?;
    // Cut off, A cannot know yet: its session keeps streaming.
    session.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut more = [0u8; 16 * 1024];
    ensure!(
        session.read_exact(&mut more).is_ok(),
        "A's session stopped before A could hear of the revocation"
    );

    a.link.restore(&a.fx.topo.bastion)?;
    session.set_read_timeout(Some(Duration::from_secs(60)))?;
    ensure!(
        ended(&mut session),
        "A's session survived the revocation it missed"
    );
    closed_with(&a.fx.agent, "revoked", 1)?;
    eventually(
        PROPAGATION,
        "A reloads the fleet after the compaction",
        || a.metric(RESYNCS).is_ok_and(|n| n >= resyncs + 1.0),
    )
    .with_context(|| {
        format!(
            "resyncs before: {resyncs}; A's log: {}",
            a.fx.agent.logs_tail(30)
        )
    })?;
    let held = a.admin_get("/v1/grants")?;
    ensure!(
        !held.contains(SUBJECT) && !held.contains(&other),
        "A still holds grants that ended while it was away: {held}"
    );
    ensure!(!a.admits(), "A admits with no grant left in the fleet");
    ensure!(
        a.fx.agent
            .logs()
            .contains("fleet watch fell behind a compaction"),
        "A did not say why it reloaded: {}",
        a.fx.agent.logs_tail(20)
    );
    Ok(())
}

/// etcd's current revision, from `etcdctl endpoint status`.
fn current_revision(etcd: &tcpgate_tests::etcd::Etcd) -> Result<i64> {
    let status = etcd.ctl(&["endpoint", "status", "-w", "json"])?;
    let value: serde_json::Value = serde_json::from_str(&status).context(status.clone())?;
    value[0]["Status"]["header"]["revision"]
        .as_i64()
        .with_context(|| format!("no revision in {status}"))
}
