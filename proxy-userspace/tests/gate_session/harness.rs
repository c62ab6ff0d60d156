//! An agent's admission and user-space relay, assembled in-process on
//! loopback without root: the gate exactly as `tcpgate run` builds it
//! (`agent::start_gate`: RSA keys from a JWKS file, the policy, the grant
//! store and the task that ends sessions with their grant), the session
//! code, the user-space data path and the agent's own accept loop. Only
//! eBPF and interception are left out.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::Value;
use tcpgate::agent::{Resolver, accept_loop, start_gate};
use tcpgate::audit::{AuditLog, AuditTarget};
use tcpgate::config::Config;
use tcpgate::datapath::userspace::UserspaceDatapath;
use tcpgate::datapath::{Datapath, DatapathKind};
use tcpgate::gate::Gate;
use tcpgate::metrics::Metrics;
use tcpgate::registry::Registry;
use tcpgate::session::{Services, Target};
use tcpgate_tests::Payload;
use tcpgate_tests::tokens::{AUDIENCE, ISSUER, TestKey, jwks};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

/// Bound for anything a test waits on ("did not hang", not a timing claim).
pub const BOUND: Duration = Duration::from_secs(20);

/// The only project the policy admits.
pub const PROJECT: &str = "group/app";

pub struct Harness {
    pub gate: Arc<Gate>,
    pub registry: Arc<Registry>,
    /// What clients dial: the forward's listener.
    pub listen: SocketAddr,
    pub upstream: Upstream,
    /// The issuer's signing key (its public half is in the JWKS file).
    pub key: TestKey,
    audit_path: PathBuf,
    /// Stops the accept loop and the gate's tasks when dropped.
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// Starts the agent's pieces; the upstream sends `down` on every
    /// connection.
    pub async fn start(down: Payload) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = TestKey::new("rsa-1", Algorithm::RS256);
        let jwks_file = dir.path().join("jwks.json");
        std::fs::write(&jwks_file, jwks(&[&key])).expect("write jwks");
        let upstream = Upstream::start(down).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listen = listener.local_addr().expect("listener address");
        let audit_path = dir.path().join("audit.log");
        let config = Config::from_toml(
            &config_toml(listen, upstream.addr, &audit_path, &jwks_file),
            Path::new("in-process.toml"),
        )
        .expect("config is valid");

        let (stop, stopped) = watch::channel(false);
        let registry = Registry::new(config.agent.max_sessions as usize);
        let gate = start_gate(&config, &registry, None, &stopped)
            .await
            .expect("gate starts")
            .expect("[auth] is configured");
        let metrics = Arc::new(Metrics::new(DatapathKind::Userspace, None, None));
        let audit = AuditLog::open(
            &AuditTarget::parse(&config.audit.path),
            metrics.audit_dropped(),
        )
        .await
        .expect("audit log opens");
        let services = Arc::new(Services {
            datapath: Datapath::Userspace(Arc::new(UserspaceDatapath::new(
                config.agent.stall_timeout,
            ))),
            audit,
            registry: Arc::clone(&registry),
            connect_timeout: config.agent.connect_timeout,
            stall_timeout: config.agent.stall_timeout,
            upstream_mark: None,
            interceptor: None,
            gate: Some(Arc::clone(&gate)),
            metrics,
            parking: Default::default(),
        });
        let target = Target {
            destination: listen,
            upstream: upstream.addr,
        };
        tokio::spawn(accept_loop(
            listener,
            Resolver::Fixed(target),
            services,
            stopped,
            TaskTracker::new(),
        ));
        Harness {
            gate,
            registry,
            listen,
            upstream,
            key,
            audit_path,
            _stop: stop,
            _dir: dir,
        }
    }

    /// A blocking client socket to the listener from `source` (any
    /// 127.0.0.0/8 address is local), for the testkit's std-IO helpers.
    pub async fn dial_from(&self, source: IpAddr) -> std::net::TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind source");
        let stream = socket.connect(self.listen).await.expect("connect");
        let stream = stream.into_std().expect("std stream");
        stream.set_nonblocking(false).expect("blocking");
        stream.set_read_timeout(Some(BOUND)).expect("timeout");
        stream
    }

    pub async fn dial(&self) -> std::net::TcpStream {
        self.dial_from(IpAddr::from([127, 0, 0, 1])).await
    }

    /// Waits (bounded) for an audit event of `kind` matching `pred`.
    pub async fn audit_event(
        &self,
        kind: &'static str,
        pred: impl Fn(&Value) -> bool + Send + 'static,
    ) -> Value {
        let path = self.audit_path.clone();
        tokio::task::spawn_blocking(move || {
            tcpgate_tests::wait_for_audit(&path, |e| e["event"] == kind && pred(e), BOUND)
        })
        .await
        .expect("audit wait")
        .expect("audit event")
    }

    /// Every audit event written so far.
    pub fn audit_events(&self) -> Vec<Value> {
        tcpgate_tests::read_audit(&self.audit_path).expect("audit file")
    }
}

/// A forward to the upstream, one issuer with keys from a JWKS file, and a
/// policy that lets `group/app` reach only the forward's address.
fn config_toml(listen: SocketAddr, upstream: SocketAddr, audit: &Path, jwks: &Path) -> String {
    format!(
        "[agent]\nstall_timeout = \"30s\"\n\n[audit]\npath = {audit:?}\n\n\
         [[forward]]\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n\n\
         [auth]\npreamble_timeout = \"2s\"\naudit_claims = [\"project_path\"]\n\
         [[auth.issuer]]\nissuer = {ISSUER:?}\naudience = {AUDIENCE:?}\njwks_file = {jwks:?}\n\n\
         [[policy]]\nname = \"deploy\"\nissuer = {ISSUER:?}\nmax_lifetime = \"15m\"\n\
         match = {{ project_path = {PROJECT:?} }}\n\
         allow = [ {{ prefix = \"{ip}/32\", ports = [\"{port}\"] }} ]\n",
        audit = audit.display().to_string(),
        jwks = jwks.display().to_string(),
        ip = listen.ip(),
        port = listen.port(),
    )
}

/// The upstream service: on every connection it sends its payload, reads
/// until the client's end of stream, reports everything it received, and
/// only then closes.
pub struct Upstream {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Upstream {
    async fn start(down: Payload) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (report, received) = mpsc::unbounded_channel();
        let count = Arc::clone(&accepted);
        let down = Arc::new(down.to_vec());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (mut rx, mut tx) = stream.into_split();
                let down = Arc::clone(&down);
                let report = report.clone();
                tokio::spawn(async move {
                    let writer = tokio::spawn(async move {
                        let _ = tx.write_all(&down).await;
                        tx
                    });
                    let mut got = Vec::new();
                    // A reset (revocation) ends the read like EOF does.
                    let _ = rx.read_to_end(&mut got).await;
                    let _ = report.send(got);
                    // Closes only after the client did: until then only
                    // the agent can end the session.
                    if let Ok(mut tx) = writer.await {
                        let _ = tx.shutdown().await;
                    }
                });
            }
        });
        Upstream {
            addr,
            accepted,
            received,
        }
    }

    /// Connections the agent opened to the upstream so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// What the next upstream connection to end received, in full.
    pub async fn next_received(&mut self) -> Vec<u8> {
        tokio::time::timeout(BOUND, self.received.recv())
            .await
            .expect("an upstream connection ended in time")
            .expect("upstream server running")
    }
}

/// Reads until the agent ends the connection (EOF or a reset) and returns
/// what arrived; fails the test if it is still open after [`BOUND`].
pub fn read_until_closed(stream: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::{ErrorKind, Read as _};
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the connection was not ended within {BOUND:?}: {e}"),
    }
    got
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
