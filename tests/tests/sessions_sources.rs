//! `tcpgate sessions` lists every live session whichever path it took:
//! routed flows from the pinned `flows` map (with the id their audit lines
//! carry), a forward-only user-space agent's sessions from its operator
//! socket, and the pinned sessions when the operator socket does not
//! answer. (Kernel-path listing: operator.rs; across takeovers:
//! takeover.rs.)

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tcpgate_tests::operator::{
    self as op, Continue, exchange, open_session, run, sessions_json_with, sized_server,
};
use tcpgate_tests::routed::routed_fixture;
use tcpgate_tests::{
    Agent, DataPath, ForwardFixture, Signal, Topology, eventually, pinned_entries, require_root,
    wait_events,
};

/// The status `doc` gives `source` (`answered`, `absent`, `failed`).
fn status<'a>(doc: &'a Value, source: &str) -> &'a str {
    doc["sources"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["source"] == source))
        .and_then(|s| s["status"].as_str())
        .unwrap_or("missing")
}

fn rows(doc: &Value) -> Result<&Vec<Value>> {
    doc["sessions"].as_array().context("sessions array")
}

/// `tcpgate sessions --json --sample 200ms` with `args`: the one session's
/// rate each way, measured between two readings of its counters (idle
/// here, so 0, but a number only if both readings listed it).
fn sampled_rates<S: AsRef<std::ffi::OsStr>>(agent: &Agent, args: &[S]) -> Result<(f64, f64)> {
    let mut command = agent.cli_command();
    command
        .args(["sessions", "--json", "--sample", "200ms"])
        .args(args);
    let (code, stdout, stderr) = run(command)?;
    ensure!(code == 0, "sessions --sample ({code}): {stderr}");
    let doc: Value = serde_json::from_str(&stdout).with_context(|| stdout.clone())?;
    let listed = rows(&doc)?;
    ensure!(listed.len() == 1, "{doc:#}");
    let rate = |key: &str| {
        listed[0][key]
            .as_f64()
            .with_context(|| format!("{key}: {doc:#}"))
    };
    Ok((
        rate("rate_up_bytes_per_second")?,
        rate("rate_down_bytes_per_second")?,
    ))
}

/// A routed flow is listed (datapath `routed`, the grant, the session id
/// of its audit lines) with the bytes the tc programs counted, equal to
/// the payload each way; once both ends close it is gone from the list,
/// and after `linger` from the map, with its close line under the same id.
#[test]
fn a_routed_flow_is_listed_with_its_payload_and_its_audit_id() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let fx = routed_fixture("")?;
    let server = sized_server(&fx.topo)?;
    let grant = fx.grant_from_runner(&fx.token(), &["--allow", "192.0.2.10=9000"])?;
    let (up, down) = (300_017u64, 2_000_003u64);
    let stream = open_session(&fx.topo, up, down)?;
    let open = &wait_events(&fx.agent, "session_open", 1)?[0];
    ensure!(open["datapath"] == "routed", "{open}");
    let config = fx.agent.config_path();
    let doc = sessions_json_with(
        fx.agent.binary(),
        [std::ffi::OsStr::new("--config"), config.as_os_str()],
    )?;
    let listed = rows(&doc)?;
    ensure!(listed.len() == 1, "one routed session: {doc:#}");
    let row = &listed[0];
    ensure!(
        row["datapath"] == "routed"
            && row["session_id"] == open["session_id"]
            && row["grant_id"] == grant.as_str()
            && row["subject"] == open["subject"]
            && row["auth"] == "source_grant"
            && row["client"] == stream.local_addr()?.to_string()
            && row["destination"] == "192.0.2.10:9000"
            && row["listed_by"] == serde_json::json!(["routed_flows"]),
        "the row matches the flow and its open line: {row:#}\n{open}"
    );
    ensure!(
        row["bytes_up"] == up && row["bytes_down"] == down,
        "FLOWS counters against the payload ({up}/{down}): {row:#}"
    );
    ensure!(
        status(&doc, "routed_flows") == "answered" && status(&doc, "operator_socket") == "answered",
        "{doc:#}"
    );
    let rates = sampled_rates(
        &fx.agent,
        &[std::ffi::OsStr::new("--config"), config.as_os_str()],
    )?;
    ensure!(rates.0 < 1.0 && rates.1 < 1.0, "an idle flow: {rates:?}");
    op::close(stream);
    eventually(
        Duration::from_secs(20),
        "the ended flow leaves the list",
        || -> Result<bool> {
            let doc = sessions_json_with(
                fx.agent.binary(),
                [std::ffi::OsStr::new("--config"), config.as_os_str()],
            )?;
            Ok(rows(&doc)?.is_empty())
        },
    )?;
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["session_id"] == open["session_id"]
            && closed["kernel_bytes_up"] == up
            && closed["kernel_bytes_down"] == down,
        "{closed}"
    );
    ensure!(
        pinned_entries(fx.agent.pin_dir(), "flows")?.is_empty(),
        "removed after linger"
    );
    server.stop()?;
    Ok(())
}

/// An agent without the eBPF programs pins nothing: its operator socket
/// lists its session, with the bytes moved; once the agent is gone no
/// source answers, and the error says where it looked.
#[test]
fn a_forward_only_agents_session_comes_from_its_operator_socket() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let admin = dir.path().join("admin.sock");
    let section = format!("\n[admin]\nsocket = {:?}\n", admin.display().to_string());
    let mut fx = ForwardFixture::start_with(DataPath::Userspace, &section)?;
    let server = sized_server(&fx.topo)?;
    let mut stream = fx.dial()?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let (up, down) = (70_001u64, 1_234_567u64);
    exchange(&mut stream, up, down)?;
    let config = fx.agent.config_path().to_owned();
    let args = [std::ffi::OsStr::new("--config"), config.as_os_str()];
    // The relay counts what it copied; the last read may still be on its way.
    let doc = eventually(
        Duration::from_secs(20),
        "the session's bytes are counted",
        || -> Result<Option<Value>> {
            let doc = sessions_json_with(fx.agent.binary(), args)?;
            let counted = rows(&doc)?
                .first()
                .is_some_and(|r| r["bytes_up"] == up && r["bytes_down"] == down);
            Ok(counted.then_some(doc))
        },
    )
    .with_context(|| fx.dump())?;
    let listed = rows(&doc)?;
    ensure!(
        listed.len() == 1
            && listed[0]["datapath"] == "userspace"
            && listed[0]["client"] == stream.local_addr()?.to_string()
            && listed[0]["listed_by"] == serde_json::json!(["operator_socket"]),
        "{doc:#}"
    );
    ensure!(
        status(&doc, "pinned_sessions") == "absent"
            && status(&doc, "operator_socket") == "answered",
        "{doc:#}"
    );
    let rates = sampled_rates(&fx.agent, &args)?;
    ensure!(rates.0 < 1.0 && rates.1 < 1.0, "an idle session: {rates:?}");
    op::close(stream);
    fx.wait_closed(1)?;
    fx.agent.stop()?;
    let mut command = fx.agent.cli_command();
    command.args(["sessions", "--sample", "0"]).args(args);
    let (code, _, stderr) = run(command)?;
    ensure!(
        code == 1
            && stderr.contains("does not exist")
            && stderr.contains(&format!(
                "the operator socket unix:{} did not answer",
                admin.display()
            )),
        "nothing to list, and where it looked ({code}): {stderr}"
    );
    server.stop()?;
    Ok(())
}

/// With the agent stopped (SIGSTOP: its socket accepts but never answers),
/// the pinned maps still list its kernel-path sessions; the table mode says
/// on stderr that the operator socket did not answer, the JSON names the
/// sources that did.
#[test]
fn a_stopped_agents_pinned_sessions_are_listed_without_its_socket() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::new()?;
    let server = sized_server(&topo)?;
    let mut agent = op::start(&topo, "")?;
    let stream = open_session(&topo, 5_000, 80_000)?;
    let client = stream.local_addr()?.to_string();
    let config = agent.config_path().to_owned();
    let args = [std::ffi::OsStr::new("--config"), config.as_os_str()];
    let doc = sessions_json_with(agent.binary(), args)?;
    ensure!(
        rows(&doc)?.len() == 1
            && rows(&doc)?[0]["listed_by"]
                == serde_json::json!(["pinned_sessions", "operator_socket"])
            && rows(&doc)?[0]["bytes_up"] == 5_000
            && rows(&doc)?[0]["bytes_down"] == 80_000,
        "one session, from both sources: {doc:#}"
    );
    agent.signal(Signal::SIGSTOP)?;
    let resume = Continue(agent.pid());
    let mut command = agent.cli_command();
    command
        .args(["sessions", "--sample", "0", "--api-timeout", "500ms"])
        .args(args);
    let (code, table, stderr) = run(command)?;
    ensure!(
        code == 0 && table.contains(&client) && table.contains("1 live session(s)"),
        "the pinned map answers ({code}): {table}\n{stderr}"
    );
    ensure!(
        stderr.contains("the operator socket") && stderr.contains("did not answer"),
        "the table says the socket did not answer: {stderr}"
    );
    let mut json = args.iter().map(|a| a.to_os_string()).collect::<Vec<_>>();
    json.extend(["--api-timeout".into(), "500ms".into()]);
    let doc = sessions_json_with(agent.binary(), json)?;
    ensure!(
        status(&doc, "pinned_sessions") == "answered"
            && status(&doc, "operator_socket") == "failed"
            && rows(&doc)?.len() == 1
            && rows(&doc)?[0]["listed_by"] == serde_json::json!(["pinned_sessions"]),
        "{doc:#}"
    );
    drop(resume);
    op::close(stream);
    drop(agent);
    server.stop()?;
    Ok(())
}
