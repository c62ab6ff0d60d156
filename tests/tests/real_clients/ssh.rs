//! OpenSSH on the target, and an ssh client configuration whose host
//! `target` is reached through `tcpgate connect` as `ProxyCommand`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, ensure};
use tcpgate_tests::{ChildGuard, Netns};

use tcpgate_tests::auth_fixture::AuthFixture;

fn ssh_keygen(path: &Path) -> Result<()> {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()?;
    ensure!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Debian's sshd in the target namespace, with throwaway keys.
pub fn start_sshd(ns: &Netns, dir: &Path) -> Result<ChildGuard> {
    ssh_keygen(&dir.join("host_key"))?;
    ssh_keygen(&dir.join("client_key"))?;
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
    // Privilege separation directory the packaged sshd expects.
    std::fs::create_dir_all("/run/sshd")?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress 192.0.2.10\nPort 22\nHostKey {dir}/host_key\nAuthorizedKeysFile {dir}/authorized_keys\n\
             PidFile {dir}/sshd.pid\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n",
            dir = dir.display()
        ),
    )?;
    let mut sshd = ns.command("/usr/sbin/sshd");
    sshd.args(["-D", "-e", "-f"]).arg(&config);
    let child = ChildGuard::spawn_logged(&mut sshd, dir, "sshd")?;
    crate::wait_listening(ns, AuthFixture::target(22), "sshd")?;
    Ok(child)
}

/// sshd on the target plus a client config (`ssh -F <config> target`) that
/// authenticates each connection with a fresh token through `tcpgate connect`.
pub struct SshSetup {
    pub config: PathBuf,
    _sshd: ChildGuard,
}

impl SshSetup {
    pub fn start(fx: &AuthFixture, dir: &Path) -> Result<Self> {
        let sshd = start_sshd(&fx.topo.target, dir)?;
        let token = fx.token_file(&fx.token())?;
        let config = dir.join("ssh_config");
        std::fs::write(
            &config,
            format!(
                "Host target\n  HostName 192.0.2.10\n  User root\n  IdentityFile {dir}/client_key\n  \
                 IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n  \
                 UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  ConnectTimeout 20\n  \
                 ProxyCommand {bin} connect --token-file {token} %h:%p\n",
                dir = dir.display(),
                bin = fx.agent.binary().display(),
                token = token.display(),
            ),
        )?;
        Ok(Self {
            config,
            _sshd: sshd,
        })
    }

    /// The ssh command line for rsync's `-e` and git's `GIT_SSH_COMMAND`.
    pub fn ssh_command(&self) -> String {
        format!("ssh -F {}", self.config.display())
    }

    /// `ssh target <remote...>`, to run in the runner namespace.
    pub fn ssh(&self, ns: &Netns, remote: &[&str]) -> Command {
        let mut ssh = ns.command("ssh");
        ssh.arg("-F").arg(&self.config).arg("target").args(remote);
        ssh
    }
}
