//! The baselines tcpgate is measured against, started on the bastion for
//! their turn: HAProxy (TCP mode, splicing, two threads) and socat (a
//! process per connection). Neither can intercept, so each listens on the
//! bastion's runner-facing address, one port per service.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use tcpgate_tests::ChildGuard;
use tcpgate_tests::topology::{BASTION_RUNNER_V4, TARGET_V4};

use super::contender::{Env, Service, wait_listening};

fn haproxy_config() -> String {
    let mut text = String::from(
        "global\n    nbthread 2\n    maxconn 4000\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    \
         timeout server 60s\n    option splice-auto\n",
    );
    for service in Service::ALL {
        let (plain, _, proxied) = service.ports();
        text.push_str(&format!(
            "\nlisten svc{proxied}\n    bind {BASTION_RUNNER_V4}:{proxied}\n    \
             server target {TARGET_V4}:{plain}\n"
        ));
    }
    text
}

pub(super) fn start_haproxy(env: &Env<'_>) -> Result<ChildGuard> {
    let path = env.work_dir.join("haproxy.cfg");
    std::fs::write(&path, haproxy_config())
        .with_context(|| format!("cannot write {}", path.display()))?;
    let mut command = env.topo.bastion.command("haproxy");
    // -db: stay in the foreground; -f: our config only.
    command.arg("-db").arg("-f").arg(&path);
    let child = ChildGuard::spawn_logged(&mut command, env.work_dir, "haproxy")?;
    if let Some(cgroup) = env.cgroup {
        cgroup.adopt(child.pid())?;
    }
    let mut child = child;
    let binds: Vec<SocketAddr> = proxied_ports()
        .into_iter()
        .map(|p| SocketAddr::from((BASTION_RUNNER_V4, p)))
        .collect();
    wait_listening(&env.topo.bastion, &binds, &mut child)?;
    Ok(child)
}

pub(super) fn start_socat(env: &Env<'_>) -> Result<Vec<ChildGuard>> {
    let mut children = Vec::new();
    for service in Service::ALL {
        let (plain, _, proxied) = service.ports();
        let mut command = env.topo.bastion.command("socat");
        command.args([
            format!("TCP4-LISTEN:{proxied},bind={BASTION_RUNNER_V4},fork,reuseaddr,backlog=1024"),
            format!("TCP4:{TARGET_V4}:{plain}"),
        ]);
        let mut child =
            ChildGuard::spawn_logged(&mut command, env.work_dir, &format!("socat-{proxied}"))?;
        if let Some(cgroup) = env.cgroup {
            cgroup.adopt(child.pid())?;
        }
        wait_listening(
            &env.topo.bastion,
            &[SocketAddr::from((BASTION_RUNNER_V4, proxied))],
            &mut child,
        )?;
        children.push(child);
    }
    Ok(children)
}

fn proxied_ports() -> Vec<u16> {
    Service::ALL.iter().map(|s| s.ports().2).collect()
}
