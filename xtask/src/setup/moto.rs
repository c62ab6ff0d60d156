//! moto's STS server for the AWS identity tests (tests/tests/aws.rs). It is
//! not packaged in Debian 12, so it goes into its own venv from PyPI; the
//! tests' fixture (tests/src/moto.rs) starts it on loopback in a test
//! namespace and stops it afterwards.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use super::report;
use crate::cmd;
use crate::host::Host;

const STEP: &str = "moto (STS for the AWS tests)";
/// Where the venv lives; tests/src/moto.rs looks for `bin/moto_server` here.
pub const VENV: &str = "/opt/tcpgate-test/moto-venv";
/// Pinned: the tests rely on its STS answers (the XML of
/// GetCallerIdentity and AssumeRole, routing by the credential scope, its
/// default account) staying what they were checked against.
pub const MOTO_VERSION: &str = "5.1.18";

pub fn ensure(host: &Host) -> Result<()> {
    let venv = Path::new(VENV);
    let python = venv.join("bin/python3");
    if venv.join("bin/moto_server").exists()
        && installed_version(&python).as_deref() == Some(MOTO_VERSION)
    {
        report(STEP, format!("moto {MOTO_VERSION} in {VENV}"));
        return Ok(());
    }
    if !host.is_root {
        bail!(
            "moto {MOTO_VERSION} is missing from {VENV}; creating it needs root; run:\n  \
             sudo python3 -m venv {VENV} && sudo {VENV}/bin/pip install 'moto[server]=={MOTO_VERSION}'"
        );
    }
    report(
        STEP,
        format!("installing moto[server]=={MOTO_VERSION} into {VENV}"),
    );
    if !python.exists() {
        std::fs::create_dir_all(venv.parent().unwrap_or(venv))?;
        cmd::run(Command::new("python3").args(["-m", "venv", VENV]))?;
    }
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("moto[server]=={MOTO_VERSION}")),
    )?;
    match installed_version(&python) {
        Some(v) if v == MOTO_VERSION => {
            report(STEP, format!("moto {MOTO_VERSION} in {VENV}"));
            Ok(())
        }
        other => {
            bail!("pip reported success, but the venv holds moto {other:?}, not {MOTO_VERSION}")
        }
    }
}

/// The moto version installed in the venv of `python`, if any.
fn installed_version(python: &Path) -> Option<String> {
    if !python.exists() {
        return None;
    }
    cmd::read(Command::new(python).args([
        "-c",
        "import importlib.metadata as m; print(m.version('moto'))",
    ]))
    .ok()
    .map(|v| v.trim().to_owned())
}
