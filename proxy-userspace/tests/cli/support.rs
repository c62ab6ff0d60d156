//! Running the built `tcpgate` binary with files in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use jsonwebtoken::Algorithm;
pub use tcpgate_tests::tokens::*;

/// The binary cargo built for these tests.
pub fn tcpgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tcpgate"));
    // Nothing from the caller's environment picks a token or a config.
    for var in [
        "CI",
        "GITLAB_CI",
        "TCPGATE_TOKEN",
        "TCPGATE_CONFIG",
        "TCPGATE_API",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("TCPGATE_LOG", "error");
    cmd
}

/// (exit status, stdout, stderr).
pub fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("run tcpgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A bastion config with one file-keyed issuer and `policy` appended.
pub struct Bastion {
    pub dir: tempfile::TempDir,
    pub key: TestKey,
    pub config: PathBuf,
}

impl Bastion {
    pub fn new(policy: &str) -> Bastion {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = TestKey::new("rsa-1", Algorithm::RS256);
        let jwks_path = dir.path().join("jwks.json");
        std::fs::write(&jwks_path, jwks(&[&key])).expect("write jwks");
        let config = dir.path().join("tcpgate.toml");
        std::fs::write(
            &config,
            format!(
                "[intercept]\n[[intercept.prefix]]\nprefix = \"192.0.2.0/24\"\nports = [\"22\", \"5432\"]\n\n\
                 [auth]\n[[auth.issuer]]\nissuer = {ISSUER:?}\naudience = {AUDIENCE:?}\njwks_file = {jwks:?}\n\n{policy}",
                jwks = jwks_path.display().to_string(),
            ),
        )
        .expect("write config");
        Bastion { dir, key, config }
    }

    /// Writes `token` to a file and returns its path.
    pub fn token_file(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, token).expect("write token");
        path
    }

    pub fn explain(&self, token: &Path, extra: &[&str]) -> (i32, String, String) {
        let mut cmd = tcpgate();
        cmd.arg("policy")
            .arg("explain")
            .arg("--config")
            .arg(&self.config)
            .arg("--token-file")
            .arg(token)
            .args(extra);
        output(&mut cmd)
    }
}
