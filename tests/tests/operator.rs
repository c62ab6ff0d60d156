//! The operator's view: `tcpgate sessions` from the pinned maps (as root
//! and as an unprivileged member of the operator group), bpftool on the
//! pinned session map, and `tcpgate revoke` when the agent's API does not
//! answer. `/metrics` is in metrics.rs.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tcpgate_tests::auth_fixture::AuthFixture;
use tcpgate_tests::operator::{
    self as op, Continue, TempGroup, cli_in, open_session, run, sessions_json, sized_server, start,
};
use tcpgate_tests::wait_events;
use tcpgate_tests::{Agent, Signal, Topology, require_root};

/// Client address -> (bytes_up, bytes_down) of every listed session.
fn listed(doc: &Value) -> Result<BTreeMap<String, (u64, u64)>> {
    let sessions = doc["sessions"].as_array().context("sessions array")?;
    sessions
        .iter()
        .map(|s| {
            Ok((
                s["client"].as_str().context("client")?.to_owned(),
                (
                    s["bytes_up"].as_u64().context("bytes_up")?,
                    s["bytes_down"].as_u64().context("bytes_down")?,
                ),
            ))
        })
        .collect()
}

#[test]
fn sessions_json_lists_exactly_the_live_sessions_with_their_bytes() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let server = sized_server(&topo)?;
    let agent = start(&topo, "")?;
    let sizes = [(1_000u64, 50_000u64), (70_000, 300), (123_457, 2_000_000)];
    let mut expected = BTreeMap::new();
    let mut streams = Vec::new();
    for (up, down) in sizes {
        let stream = open_session(&topo, up, down)?;
        expected.insert(stream.local_addr()?.to_string(), (up, down));
        streams.push(stream);
    }
    let doc = sessions_json(agent.binary(), agent.pin_dir())?;
    ensure!(
        listed(&doc)? == expected,
        "listed {doc:#}\nexpected {expected:?}"
    );
    for session in doc["sessions"].as_array().context("sessions")? {
        ensure!(
            session["destination"] == "192.0.2.10:9000"
                && session["datapath"] == "ebpf"
                && session["auth"] == "none"
                && session["grant_id"].is_null(),
            "{session}"
        );
    }
    // The table names every client; the sample measures an idle rate.
    let mut command = agent.cli_command();
    command
        .args(["sessions", "--sample", "200ms", "--pin-dir"])
        .arg(agent.pin_dir());
    let (status, table, stderr) = run(command)?;
    ensure!(status == 0, "table: {stderr}");
    for client in expected.keys() {
        ensure!(
            table.contains(client.as_str()),
            "{client} missing:\n{table}"
        );
    }
    ensure!(table.contains("3 live session(s)"), "{table}");
    ensure!(
        table.contains("0 bit/s"),
        "idle sessions have no rate:\n{table}"
    );
    watch_refreshes(&agent, expected.len())?;
    // Ended sessions leave the map.
    let first = streams.remove(0);
    expected.remove(&first.local_addr()?.to_string());
    op::close(first);
    wait_events(&agent, "session_close", 1)?;
    let doc = sessions_json(agent.binary(), agent.pin_dir())?;
    ensure!(listed(&doc)? == expected, "after one close: {doc:#}");
    streams.into_iter().for_each(op::close);
    wait_events(&agent, "session_close", 3)?;
    ensure!(listed(&sessions_json(agent.binary(), agent.pin_dir())?)?.is_empty());
    let mut command = agent.cli_command();
    command.args(["sessions", "--pin-dir", "/sys/fs/bpf/tg-test-no-such-agent"]);
    let (status, _, stderr) = run(command)?;
    ensure!(
        status == 1 && stderr.contains("does not exist: is the tcpgate agent running"),
        "a missing pin directory is explained: {stderr}"
    );
    drop(agent);
    server.stop()?;
    Ok(())
}

/// `--watch --json` prints one document per refresh, with rates from the
/// second one on.
fn watch_refreshes(agent: &Agent, sessions: usize) -> Result<()> {
    use std::io::BufRead;
    let mut command = agent.cli_command();
    command
        .args(["sessions", "--json", "--watch", "100ms", "--pin-dir"])
        .arg(agent.pin_dir())
        .stdout(std::process::Stdio::piped());
    let mut spawned = command.spawn()?;
    let stdout = spawned.stdout.take().context("piped stdout")?;
    let child = tcpgate_tests::ChildGuard::new(spawned, "sessions --watch");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut docs = Vec::new();
    while docs.len() < 2 {
        let line = rx.recv_timeout(Duration::from_secs(30))??;
        docs.push(serde_json::from_str::<Value>(&line).with_context(|| line.clone())?);
    }
    drop(child);
    for (i, doc) in docs.iter().enumerate() {
        let listed = doc["sessions"].as_array().context("sessions")?;
        ensure!(listed.len() == sessions, "refresh {i}: {doc}");
        ensure!(
            listed
                .iter()
                .all(|s| s["rate_up_bytes_per_second"].is_null() == (i == 0)),
            "rates from the second refresh on: {doc}"
        );
    }
    Ok(())
}

#[test]
fn bpftool_dumps_the_session_map_with_field_names() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let server = sized_server(&topo)?;
    let agent = start(&topo, "")?;
    let stream = open_session(&topo, 4_321, 1_234)?;
    let entries = tcpgate_tests::pinned_entries(agent.pin_dir(), "sessions")?;
    ensure!(entries.len() == 1, "{entries:?}");
    // With BTF, `bpftool -j` adds the decoded record under "formatted".
    let value = &entries[0]["formatted"]["value"];
    ensure!(
        value["client_port"] == stream.local_addr()?.port()
            && value["dest_port"] == 9000
            && value["up"]["kernel_bytes"] == 4_321
            && value["down"]["kernel_bytes"] == 1_234
            && value["datapath"] == 1,
        "named fields: {:#}",
        entries[0]
    );
    op::close(stream);
    drop(agent);
    server.stop()?;
    Ok(())
}

#[test]
fn operator_group_member_reads_sessions_without_root() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let group = TempGroup::new()?;
    let topo = Topology::new()?;
    let server = sized_server(&topo)?;
    let agent = start(&topo, &format!("operator_group = {:?}", group.name))?;
    let stream = open_session(&topo, 2_000, 3_000)?;
    let pin = agent.pin_dir().to_str().context("utf-8")?.to_owned();
    let bin = agent.binary().to_str().context("utf-8")?.to_owned();
    let gid = group.gid.to_string();
    // uid/gid 65534 (nobody), with and without the operator group.
    let as_nobody = |groups: &[&str]| {
        let mut command = std::process::Command::new("setpriv");
        command
            .args(["--reuid", "65534", "--regid", "65534"])
            .args(groups)
            .args([
                bin.as_str(),
                "sessions",
                "--json",
                "--sample",
                "0",
                "--pin-dir",
                &pin,
            ]);
        run(command)
    };
    let (status, stdout, stderr) = as_nobody(&["--groups", &gid])?;
    ensure!(status == 0, "member of {}: {stderr}", group.name);
    let doc: Value = serde_json::from_str(&stdout)?;
    let mut expected = BTreeMap::new();
    expected.insert(stream.local_addr()?.to_string(), (2_000, 3_000));
    ensure!(listed(&doc)? == expected, "{doc:#}");
    let (status, _, stderr) = as_nobody(&["--clear-groups"])?;
    ensure!(
        status == 1 && stderr.contains(&format!("join the operator group {}", group.name)),
        "a non-member is told what is missing ({status}): {stderr}"
    );
    // Root wrote the maps 0640: the group reads, only root writes.
    let meta = std::fs::metadata(agent.pin_dir().join("sessions"))?;
    use std::os::unix::fs::MetadataExt;
    ensure!(
        meta.mode() & 0o777 == 0o640 && meta.gid() == group.gid,
        "{meta:?}"
    );
    op::close(stream);
    drop(agent);
    server.stop()?;
    Ok(())
}

#[test]
fn revoke_without_the_api_destroys_the_sessions_of_a_stopped_agent() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut fx = AuthFixture::start()?;
    let server = sized_server(&fx.topo)?;
    let grant = fx.grant_from_runner(&fx.token(), &[])?;
    let plain = |up, down| -> Result<std::net::TcpStream> {
        let mut stream = fx.dial_from_runner(AuthFixture::target(9000))?;
        op::exchange(&mut stream, up, down)?;
        Ok(stream)
    };
    let mut sessions = vec![plain(1_000, 2_000)?, plain(3_000, 4_000)?];
    let pin = fx.agent.pin_dir().to_str().context("utf-8")?.to_owned();
    let admin = fx.admin_socket().display().to_string();
    let common_args = ["--admin", &admin, "--api-timeout", "1s", "--pin-dir", &pin];
    let bin = fx.agent.binary().to_owned();

    fx.agent.signal(Signal::SIGSTOP)?;
    let _resume = Continue(fx.agent.pid());
    let mut args = vec!["grants", "--json"];
    args.extend(common_args);
    let (status, stdout, stderr) = run(cli_in(&fx.topo.bastion, &bin, &args)?)?;
    let listing: Value = serde_json::from_str(&stdout).with_context(|| stderr.clone())?;
    ensure!(
        status == 0 && listing["source"] == "pinned_map",
        "{listing:#} {stderr}"
    );
    ensure!(
        listing["grants"][0]["grant_id"] == grant.as_str() && listing["grants"][0]["sessions"] == 2,
        "{listing:#}"
    );
    let mut args = vec!["revoke"];
    args.extend(common_args);
    args.push(&grant);
    let (status, stdout, stderr) = run(cli_in(&fx.topo.bastion, &bin, &args)?)?;
    ensure!(
        status == 0
            && stderr.contains("did not answer")
            && stdout.contains("through the pinned map, 2 session(s) ended")
            && stdout.contains("4 of 4 socket(s) destroyed"),
        "revoke fallback ({status}):\n{stdout}\n{stderr}"
    );
    for stream in &mut sessions {
        ensure!(
            op::ended(stream),
            "the session ends while the agent is stopped"
        );
    }
    let ends = server.stop()?;
    ensure!(
        ends.len() == 2,
        "the upstream connections ended too: {ends:?}"
    );

    fx.agent.signal(Signal::SIGCONT)?;
    let closed = wait_events(&fx.agent, "session_close", 2)?;
    for event in &closed {
        ensure!(
            event["reason"] == "revoked" && event["grant_id"] == grant.as_str(),
            "{event}"
        );
    }
    // Once running, the agent revokes the grant itself: its source is no
    // longer admitted.
    let mut listing = Value::Null;
    tcpgate_tests::eventually(
        Duration::from_secs(20),
        "the agent to revoke the flagged grant",
        || -> Result<bool> {
            let args = ["grants", "--json", "--admin", &admin];
            let (_, stdout, _) = run(cli_in(&fx.topo.bastion, &bin, &args)?)?;
            listing = serde_json::from_str(&stdout).unwrap_or_default();
            Ok(listing["source"] == "api"
                && listing["grants"].as_array().is_some_and(Vec::is_empty))
        },
    )
    .with_context(|| format!("grant still listed: {listing:#}"))?;
    let mut again = fx.dial_from_runner(AuthFixture::target(9000))?;
    again.write_all(b"no preamble")?;
    ensure!(op::ended(&mut again), "the revoked source is refused");
    let denied = wait_events(&fx.agent, "connection_denied", 1)?;
    ensure!(denied[0]["reason"] == "auth_failed", "{}", denied[0]);
    Ok(())
}
