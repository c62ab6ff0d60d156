//! The README's "First deployment", followed as written: its certificate
//! commands make the grant API's CA and leaf, its configuration passes
//! `tcpgate check-config`, and the job's two commands (`tcpgate grant --ca`,
//! then a plain `psql`) reach PostgreSQL through an agent serving that very
//! certificate. Only what cannot be the same in a test is replaced: the
//! `/etc/tcpgate` directory, the token file, the binary's path and the API
//! port; the issuer and the topology are the test fixture's.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use tcpgate_tests::require_root;
use tcpgate_tests::tls::ApiCert;

use tcpgate_tests::auth_fixture::{API_PORT, AuthFixture, Launch, policy};
use tcpgate_tests::wait_events;

/// The code block that follows `<!-- checked: first-deployment/NAME -->` in
/// the README, with the list indentation removed.
fn readme_block(name: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).context("read README.md")?;
    let marker = format!("<!-- checked: first-deployment/{name} -->");
    let (_, after) = readme
        .split_once(&marker)
        .with_context(|| format!("README.md has no {marker}"))?;
    let mut lines = after.lines().skip_while(|l| l.trim().is_empty());
    let fence = lines.next().context("nothing after the marker")?;
    ensure!(
        fence.trim_start().starts_with("```"),
        "{marker} is not followed by a code block but {fence:?}"
    );
    let indent = fence.len() - fence.trim_start().len();
    let mut body = String::new();
    for line in lines {
        if line.trim_start().starts_with("```") {
            return Ok(body);
        }
        body.push_str(line.get(indent..).unwrap_or_else(|| line.trim_start()));
        body.push('\n');
    }
    bail!("{marker}: the code block never ends")
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str().context("a UTF-8 path")
}

#[test]
fn the_readmes_first_deployment_works_as_written() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let etc = tempfile::tempdir()?;
    let etc_dir = utf8(etc.path())?;

    // Step 3: the certificate commands, as written.
    let certificate = readme_block("certificate")?.replace("/etc/tcpgate", etc_dir);
    let made = Command::new("sh").args(["-ec", &certificate]).output()?;
    ensure!(
        made.status.success(),
        "the README's certificate commands failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );

    // Steps 5 and 6: an agent serving the README's certificate, PostgreSQL
    // at 192.0.2.10, and the job's commands on the runner.
    let ca = etc.path().join("bastion-ca.pem");
    let fx = AuthFixture::start_launched(
        &policy("15m"),
        &[],
        Launch {
            api_cert: Some(ApiCert {
                cert: etc.path().join("api.pem"),
                key: etc.path().join("api.key"),
                trust: ca.clone(),
            }),
            ..Launch::default()
        },
    )?;
    // Step 4: the configuration passes check-config.
    let config = etc.path().join("tcpgate.toml");
    std::fs::write(
        &config,
        readme_block("config")?.replace("/etc/tcpgate", etc_dir),
    )?;
    let checked = Command::new(fx.agent.binary())
        .args(["check-config", "--config", utf8(&config)?])
        .output()?;
    ensure!(
        checked.status.success(),
        "the README's configuration: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let data = tempfile::tempdir()?;
    let _postgres = crate::start_postgres(&fx.topo.target, data.path())?;
    let token_file = fx.token_file(&fx.token())?;
    let job = readme_block("job")?
        .replace(
            "tcpgate grant",
            &format!("{} grant", fx.agent.binary().display()),
        )
        .replace("/tmp/job.jwt", utf8(&token_file)?)
        .replace(":8443", &format!(":{API_PORT}"));
    let ran = fx
        .topo
        .runner
        .command("sh")
        .args(["-ec", &job])
        .env("BASTION_CA", &ca)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()?;
    let stdout = String::from_utf8_lossy(&ran.stdout);
    ensure!(
        ran.status.success() && stdout.contains("(1 row)"),
        "the job's commands: {}, stdout {stdout}, stderr {}",
        ran.status,
        String::from_utf8_lossy(&ran.stderr)
    );
    let closed = &wait_events(&fx.agent, "session_close", 1)?[0];
    ensure!(
        closed["destination"] == "192.0.2.10:5432" && closed["grant_id"].is_string(),
        "{closed}"
    );
    Ok(())
}
