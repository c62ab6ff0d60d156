//! TLS to etcd: the fleet works over `https://` with client certificates,
//! and etcd refuses, from the attacker's side, an agent without the
//! fleet's client certificate or with one from another CA; an agent that
//! cannot check etcd's certificate against `[cluster] ca` refuses etcd.
//! Either way the agent says which etcd and why, and never reports ready.

use anyhow::{Context, Result, bail, ensure};
use tcpgate_tests::etcd::{Etcd, EtcdTls};
use tcpgate_tests::tls::{Ca, Usage};
use tcpgate_tests::{eventually, require_root};

use super::fleet::{PROPAGATION, bastion_with, services};

/// `[cluster]` TLS lines: etcd's CA and a client certificate of its own.
fn tls_lines(tls: &EtcdTls, stem: &str) -> String {
    let client = tls.client(stem);
    format!(
        "ca = {:?}\ncert = {:?}\nkey = {:?}\n",
        tls.ca.cert, client.cert, client.key
    )
}

#[test]
fn over_tls_a_grant_through_one_bastion_admits_through_another() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut etcd = Etcd::start_tls(1)?;
    let tls = etcd.tls().context("an etcd started with TLS")?.clone();
    let a = bastion_with(&mut etcd, "bastion-a", &tls_lines(&tls, "bastion-a"))?;
    let b = bastion_with(&mut etcd, "bastion-b", &tls_lines(&tls, "bastion-b"))?;
    ensure!(
        a.link.urls.iter().all(|u| u.starts_with("https://")),
        "{:?}",
        a.link.urls
    );
    let _services = services(&b)?;
    ensure!(!b.admits(), "B admitted a runner before any grant");
    let grant = a.fx.grant_from_runner(&a.fx.token(), &[])?;
    eventually(PROPAGATION, "B admits under A's grant over TLS", || {
        b.admits()
    })?;
    // The record went through etcd (read back by etcdctl, over TLS too).
    let keys = etcd.ctl(&["get", "--prefix", "--keys-only", "/tcpgate/"])?;
    ensure!(keys.contains(grant.as_str()), "etcd's keys: {keys}");
    let ready = b.admin_get("/readyz")?;
    ensure!(ready.contains("cluster bastion-b: connected"), "{ready}");
    Ok(())
}

#[test]
fn etcd_and_the_agent_refuse_each_other_without_the_fleets_certificates() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut etcd = Etcd::start_tls(1)?;
    let tls = etcd.tls().context("an etcd started with TLS")?.clone();
    // A fleet member holds a grant the intruders must never get.
    let a = bastion_with(&mut etcd, "bastion-a", &tls_lines(&tls, "bastion-a"))?;
    a.fx.grant_from_runner(&a.fx.token(), &[])?;
    let rogue_dir = tempfile::tempdir()?;
    let rogue_ca = Ca::new(rogue_dir.path(), "rogue-ca");
    let rogue = rogue_ca.leaf(rogue_dir.path(), "rogue", &[], Usage::Client);
    let good = tls.client("intruder-good");
    // What the agent is given, and the cause it must report: etcd's TLS
    // alert, or rustls's verdict on etcd's certificate.
    let cases = [
        (
            "no client certificate",
            format!("ca = {:?}\n", tls.ca.cert),
            "received fatal alert",
        ),
        (
            "a client certificate from another CA",
            format!(
                "ca = {:?}\ncert = {:?}\nkey = {:?}\n",
                tls.ca.cert, rogue.cert, rogue.key
            ),
            "received fatal alert: BadCertificate",
        ),
        (
            "etcd's certificate checked against another CA",
            format!(
                "ca = {:?}\ncert = {:?}\nkey = {:?}\n",
                rogue_ca.cert, good.cert, good.key
            ),
            "invalid peer certificate: UnknownIssuer",
        ),
    ];
    for (what, lines, cause) in cases {
        let Err(e) = bastion_with(&mut etcd, "intruder", &lines) else {
            bail!("an agent with {what} loaded the fleet and reported ready");
        };
        let text = format!("{e:#}");
        ensure!(
            text.contains("not READY=1")
                && text.contains("cannot follow the fleet's etcd")
                && text.contains("https://[2001:db8:e7cd:")
                && text.contains(cause),
            "with {what}, the agent did not say which etcd and why ({cause}): {text}"
        );
    }
    Ok(())
}
