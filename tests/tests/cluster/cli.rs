//! `tcpgate grants --cluster`: the fleet's grants as an operator lists
//! them on any bastion, with the bastion that issued each.

use anyhow::{Context, Result, ensure};
use tcpgate_tests::auth_fixture::AuthFixture;
use tcpgate_tests::{eventually, require_root};

use super::fleet::{Bastion, PROPAGATION, SUBJECT, fleet};

/// `tcpgate grants --cluster [extra]` on `bastion`'s operator socket.
fn grants_cluster(fx: &AuthFixture, extra: &[&str]) -> Result<(i32, String, String)> {
    let admin = fx.admin_socket().display().to_string();
    let mut args = vec!["grants", "--cluster", "--admin", &admin];
    args.extend_from_slice(extra);
    fx.cli(&fx.topo.bastion, &args)
}

fn listed(b: &Bastion) -> Result<serde_json::Value> {
    let (status, stdout, stderr) = grants_cluster(&b.fx, &["--json"])?;
    ensure!(status == 0, "grants --cluster --json: {status} {stderr}");
    serde_json::from_str(&stdout).context(stdout)
}

#[test]
fn grants_cluster_lists_the_fleets_grants_with_the_issuing_bastion() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let (mut etcd, a, b) = fleet(1)?;
    let empty = listed(&b)?;
    ensure!(
        empty["schema"] == "tcpgate.fleet-grants/v1" && empty["grants"] == serde_json::json!([]),
        "{empty}"
    );
    let grant = a.fx.grant_from_runner(&a.fx.token(), &[])?;
    // Listed on B (which did not issue it) as A's, straight from etcd.
    let doc = listed(&b)?;
    let row = &doc["grants"][0];
    ensure!(
        doc["grants"].as_array().map(Vec::len) == Some(1)
            && row["grant_id"] == grant.as_str()
            && row["bastion"] == "bastion-a"
            && row["subject"] == SUBJECT
            && row["source"] == "198.51.100.2"
            && row["time_left_seconds"].as_f64().is_some_and(|t| t > 0.0),
        "{doc}"
    );
    // The table for people says the same.
    let (status, table, stderr) = grants_cluster(&b.fx, &[])?;
    ensure!(
        status == 0
            && table.contains(grant.as_str())
            && table.contains("bastion-a")
            && table.contains("1 grant(s) in the fleet"),
        "{status} {table} {stderr}"
    );
    // Without etcd there is no fleet view, and the operator is told why.
    etcd.stop_all()?;
    eventually(PROPAGATION, "grants --cluster fails without etcd", || {
        grants_cluster(&b.fx, &["--json"]).is_ok_and(|(status, _, stderr)| {
            status == 1 && stderr.contains("503") && stderr.contains("etcd")
        })
    })?;
    Ok(())
}

#[test]
fn grants_cluster_on_an_agent_without_a_fleet_says_so() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = AuthFixture::start()?;
    let (status, stdout, stderr) = grants_cluster(&fx, &[])?;
    ensure!(
        status == 1 && stdout.is_empty() && stderr.contains("no [cluster] section"),
        "{status} {stdout} {stderr}"
    );
    Ok(())
}
