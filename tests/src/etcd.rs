//! A real etcd (Debian's `etcd-server`) for the fleet tests: one or three
//! members in a namespace of their own, each bastion namespace joined to
//! it by a veth pair that a test can cut and restore.
//!
//! ```text
//!  bastion A  etcd-a 2001:db8:e7cd:1::2 ─── 2001:db8:e7cd:1::1 ┐
//!  bastion B  etcd-b 2001:db8:e7cd:2::2 ─── 2001:db8:e7cd:2::1 ┤ etcd namespace
//!                                                              │ members m0..m2
//!                                                              │ clients [::]:2379,2381,2383
//!                                                              ┘ peers [::1]:2380,2382,2384
//! ```
//!
//! Members run plain HTTP ([`Etcd::start`]) or, with [`Etcd::start_tls`],
//! HTTPS with a CA of their own and `--client-cert-auth`, each on a
//! temporary data directory. Dropping the guard stops every member and
//! removes the namespace (and with it each link) and the data.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::netns::{Netns, NetnsError};
use crate::process::{ChildGuard, ProcessError};
use crate::tls::{ApiCert, Ca, Usage};

const FIRST_CLIENT_PORT: u16 = 2379;
/// Links whose etcd-side address is in the members' certificate.
const MAX_TLS_LINKS: usize = 8;
/// How long members get to elect a leader and answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot create etcd's data directory")]
    TempDir(#[source] std::io::Error),
    #[error("etcd did not become healthy within {waited:?}: {detail}")]
    NotHealthy { waited: Duration, detail: String },
    #[error("no member {0}")]
    NoMember(usize),
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    process: Option<ChildGuard>,
}

/// One bastion namespace's link to etcd.
#[derive(Debug, Clone)]
pub struct EtcdLink {
    /// The bastion's end, in the bastion namespace.
    pub device: String,
    /// The URL of each member, as the bastion reaches it.
    pub urls: Vec<String>,
}

/// A running etcd; see the module docs.
pub struct Etcd {
    // Members stop before the namespace goes, and the data after both.
    members: Vec<Member>,
    pub ns: Netns,
    data: tempfile::TempDir,
    links: usize,
    token: String,
    tls: Option<EtcdTls>,
}

/// The certificates of an etcd that serves TLS and wants client
/// certificates.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA that signed the members' certificate and every client
    /// certificate etcd accepts (`[cluster] ca` of the bastions).
    pub ca: Ca,
    server: ApiCert,
    /// etcdctl's own client certificate.
    ctl: ApiCert,
    /// Where the certificates are written (etcd's data directory).
    dir: PathBuf,
}

impl EtcdTls {
    fn new(dir: &Path) -> EtcdTls {
        let ca = Ca::new(dir, "etcd-ca");
        // Each link's etcd-side address, and loopback for etcdctl.
        let mut names: Vec<String> = (1..=MAX_TLS_LINKS)
            .map(|n| format!("2001:db8:e7cd:{n}::1"))
            .collect();
        names.push("::1".to_owned());
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let server = ca.leaf(dir, "etcd-server", &names, Usage::ServerAndClient);
        let ctl = ca.leaf(dir, "etcdctl", &[], Usage::Client);
        EtcdTls {
            ca,
            server,
            ctl,
            dir: dir.to_owned(),
        }
    }

    /// A client certificate etcd accepts (a bastion's `[cluster] cert`
    /// and `key`), written beside etcd's own as `<stem>.pem` / `.key`.
    #[must_use]
    pub fn client(&self, stem: &str) -> ApiCert {
        self.ca.leaf(&self.dir, stem, &[], Usage::Client)
    }
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("ns", &self.ns.name())
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// Starts `members` members (1 or 3) and waits until they answer.
    pub fn start(members: usize) -> Result<Etcd, EtcdError> {
        Self::start_with(members, false)
    }

    /// Like [`Etcd::start`], over TLS with client certificates required;
    /// [`Etcd::tls`] has the CA and makes client certificates.
    pub fn start_tls(members: usize) -> Result<Etcd, EtcdError> {
        Self::start_with(members, true)
    }

    /// The certificates, for an etcd started with [`Etcd::start_tls`].
    #[must_use]
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn start_with(members: usize, tls: bool) -> Result<Etcd, EtcdError> {
        let ns = Netns::new("e")?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        let data = tempfile::Builder::new()
            .prefix("tcpgate-etcd-")
            .tempdir()
            .map_err(EtcdError::TempDir)?;
        let port = |i: usize, peer: bool| {
            FIRST_CLIENT_PORT + 2 * u16::try_from(i).unwrap_or(0) + u16::from(peer)
        };
        let mut etcd = Etcd {
            members: (0..members)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_port: port(i, false),
                    peer_port: port(i, true),
                    process: None,
                })
                .collect(),
            token: ns.name().to_owned(),
            tls: tls.then(|| EtcdTls::new(data.path())),
            ns,
            data,
            links: 0,
        };
        for i in 0..members {
            etcd.start_member(i)?;
        }
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://[::1]:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn data_dir(&self, member: &Member) -> PathBuf {
        self.data.path().join(&member.name)
    }

    /// (Re)starts member `i` on its data directory (a restart keeps the
    /// revisions it had).
    pub fn start_member(&mut self, i: usize) -> Result<(), EtcdError> {
        let cluster = self.initial_cluster();
        let member = self.members.get(i).ok_or(EtcdError::NoMember(i))?;
        let data_dir = self.data_dir(member);
        let scheme = self.scheme();
        let client = format!("{scheme}://[::]:{}", member.client_port);
        let advertise = format!("{scheme}://[::1]:{}", member.client_port);
        let peer = format!("http://[::1]:{}", member.peer_port);
        let mut command = self.ns.command("etcd");
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &advertise])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--log-level", "warn"]);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server.cert)
                .arg("--key-file")
                .arg(&tls.server.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca.cert)
                .arg("--client-cert-auth");
        }
        let name = format!("etcd-{}", member.name);
        let process = ChildGuard::spawn_logged(&mut command, self.data.path(), &name)?;
        if let Some(member) = self.members.get_mut(i) {
            member.process = Some(process);
        }
        Ok(())
    }

    /// Stops member `i` (SIGTERM, then SIGKILL after the grace period).
    pub fn stop_member(&mut self, i: usize) -> Result<(), EtcdError> {
        let member = self.members.get_mut(i).ok_or(EtcdError::NoMember(i))?;
        if let Some(mut process) = member.process.take() {
            process.terminate()?;
        }
        Ok(())
    }

    /// Stops every member: the whole store is gone.
    pub fn stop_all(&mut self) -> Result<(), EtcdError> {
        for i in 0..self.members.len() {
            self.stop_member(i)?;
        }
        Ok(())
    }

    /// Starts every stopped member again and waits until they answer.
    pub fn start_all(&mut self) -> Result<(), EtcdError> {
        for i in 0..self.members.len() {
            if self.members[i].process.is_none() {
                self.start_member(i)?;
            }
        }
        self.wait_healthy()
    }

    /// `etcdctl <args>` against the running members, inside the etcd
    /// namespace.
    pub fn ctl(&self, args: &[&str]) -> Result<String, NetnsError> {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.process.is_some())
            .map(|m| format!("{}://[::1]:{}", self.scheme(), m.client_port))
            .collect();
        let endpoints = format!("--endpoints={}", endpoints.join(","));
        let mut all = vec!["env", "ETCDCTL_API=3", "etcdctl", endpoints.as_str()];
        let tls_flags: Vec<String> = self
            .tls
            .iter()
            .flat_map(|tls| {
                [
                    format!("--cacert={}", tls.ca.cert.display()),
                    format!("--cert={}", tls.ctl.cert.display()),
                    format!("--key={}", tls.ctl.key.display()),
                ]
            })
            .collect();
        all.extend(tls_flags.iter().map(String::as_str));
        all.extend_from_slice(args);
        self.ns.exec_ok(&all)
    }

    fn wait_healthy(&self) -> Result<(), EtcdError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let detail = match self.ctl(&["endpoint", "health"]) {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .filter_map(|m| m.process.as_ref())
                    .map(|p| p.stderr_tail(10))
                    .collect();
                return Err(EtcdError::NotHealthy {
                    waited: START_TIMEOUT,
                    detail: format!("{detail}\n{}", logs.join("\n")),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Joins `bastion` to the etcd namespace with a veth pair of its own;
    /// the bastion reaches every member at the returned URLs.
    pub fn link(&mut self, bastion: &Netns) -> Result<EtcdLink, EtcdError> {
        self.links += 1;
        let n = self.links;
        let device = "etcd0".to_owned();
        let far = format!("to-b{n}");
        bastion.ip([
            "link",
            "add",
            &device,
            "type",
            "veth",
            "peer",
            "name",
            &far,
            "netns",
            self.ns.name(),
        ])?;
        // Keep the IPv6 addresses across `cut` (link down flushes them by
        // default, and `restore` would leave the bastion unreachable).
        bastion.sysctl(&format!("net.ipv6.conf.{device}.keep_addr_on_down"), "1")?;
        self.ns
            .sysctl(&format!("net.ipv6.conf.{far}.keep_addr_on_down"), "1")?;
        let ours = format!("2001:db8:e7cd:{n}::1");
        let theirs = format!("2001:db8:e7cd:{n}::2");
        self.ns
            .ip(["addr", "add", &format!("{ours}/64"), "dev", &far, "nodad"])?;
        bastion.ip([
            "addr",
            "add",
            &format!("{theirs}/64"),
            "dev",
            &device,
            "nodad",
        ])?;
        self.ns.ip(["link", "set", &far, "up"])?;
        bastion.ip(["link", "set", &device, "up"])?;
        let urls = self
            .members
            .iter()
            .map(|m| format!("{}://[{ours}]:{}", self.scheme(), m.client_port))
            .collect();
        Ok(EtcdLink { device, urls })
    }
}

impl EtcdLink {
    /// Cuts the bastion off from etcd (its end of the link goes down).
    pub fn cut(&self, bastion: &Netns) -> Result<(), NetnsError> {
        bastion.ip(["link", "set", &self.device, "down"])?;
        Ok(())
    }

    /// Joins the bastion to etcd again.
    pub fn restore(&self, bastion: &Netns) -> Result<(), NetnsError> {
        bastion.ip(["link", "set", &self.device, "up"])?;
        Ok(())
    }

    /// The TOML `etcd = [...]` value for `[cluster]`.
    #[must_use]
    pub fn toml_urls(&self) -> String {
        let quoted: Vec<String> = self.urls.iter().map(|u| format!("{u:?}")).collect();
        format!("[{}]", quoted.join(", "))
    }
}
