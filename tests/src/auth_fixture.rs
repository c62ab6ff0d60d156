//! An authenticating agent: real keys, a JWKS served over HTTPS inside the
//! bastion namespace, GitLab-shaped tokens, a policy, and helpers to speak
//! the preamble protocol (implemented here from the documented wire format,
//! independently of the agent's code).

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::jwks_server::JwksServer;
use crate::tokens::{AUDIENCE, ISSUER, TestKey, gitlab_claims, jwks};
use crate::topology::{BASTION_RUNNER_V4, BASTION_RUNNER_V6, TARGET_V4};
use crate::{Agent, Topology};
use anyhow::{Context, Result, ensure};
use jsonwebtoken::Algorithm;
use serde_json::Value;

/// Port of the runner-facing grant API on the bastion.
pub const API_PORT: u16 = 8080;
/// Intercepted ports on 192.0.2.0/24.
pub const PORTS: [u16; 3] = [22, 5432, 9000];

/// The signing keys of the test issuer: RSA, EC and Ed25519.
pub struct Keys {
    pub rsa: TestKey,
    pub ec: TestKey,
    pub ed: TestKey,
}

impl Keys {
    pub fn new() -> Self {
        Self {
            rsa: TestKey::new("rsa-1", Algorithm::RS256),
            ec: TestKey::new("ec-1", Algorithm::ES256),
            ed: TestKey::new("ed-1", Algorithm::EdDSA),
        }
    }

    pub fn jwks(&self) -> String {
        jwks(&[&self.rsa, &self.ec, &self.ed])
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new()
    }
}

/// How [`AuthFixture::start_launched`] starts its agent.
#[derive(Default)]
pub struct Launch {
    /// Run this program instead of `$TCPGATE_BIN` (a staged binary, or a
    /// wrapper that drops privileges first).
    pub binary: Option<std::path::PathBuf>,
    /// Called with the ready builder just before the agent starts.
    pub prepare: Option<Prepare>,
    /// Serve the grant API with a plain `openssl req -x509` certificate
    /// instead of a leaf signed by the test CA.
    pub self_signed_api: bool,
    /// Serve the grant API with these files (made by the README's steps,
    /// say) instead of a leaf signed by the test CA.
    pub api_cert: Option<crate::tls::ApiCert>,
    /// Lines added to `[api]` (e.g. an `[api.limits]` table follows it).
    pub api_extra: String,
    /// Lines added to `[admin]` (e.g. `listen` and `token_file`).
    pub admin_extra: String,
    /// Configure the issuer by URL alone (OIDC discovery from the JWKS
    /// server, which is then the issuer: see [`AuthFixture::issuer`]); rules
    /// naming `ISSUER` are rewritten to it.
    pub discovery: bool,
    /// Tables appended to the config (e.g. `[cluster]`).
    pub sections: String,
    /// Lines added to `[intercept]` (e.g. `interfaces`).
    pub intercept_extra: String,
    /// Lines added to `[agent]` (e.g. a takeover socket).
    pub agent_extra: String,
    /// Use this topology (prepared, say, with a link to etcd) instead of a
    /// new one.
    pub topology: Option<Topology>,
}

/// A step run on the agent's builder before it starts (e.g. handing its
/// directory to the agent's user).
pub type Prepare = Box<dyn FnOnce(&crate::AgentBuilder<'_>) -> Result<()>>;

pub struct AuthFixture {
    /// What a runner trusts for the grant API (`tcpgate grant --ca`).
    pub api_ca: std::path::PathBuf,
    /// The configured issuer: `ISSUER`, or the JWKS server's URL with
    /// [`Launch::discovery`].
    pub issuer: String,
    pub agent: Agent,
    pub jwks: JwksServer,
    pub keys: Keys,
    pub topo: Topology,
}

/// The policy: protected release refs of group/app may reach the
/// intercepted ports for at most 15 minutes.
pub fn policy(max_lifetime: &str) -> String {
    let ports: Vec<String> = PORTS.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "\n[[policy]]\nname = \"deploy\"\nissuer = {ISSUER:?}\nmax_lifetime = {max_lifetime:?}\n\
         match = {{ project_path = \"group/app\", ref_protected = true, ref = \"release/*\" }}\n\
         allow = [ {{ prefix = \"192.0.2.0/24\", ports = [{}] }} ]\n",
        ports.join(", ")
    )
}

impl AuthFixture {
    pub fn start() -> Result<Self> {
        Self::start_with(&policy("15m"), &[])
    }

    /// `policy_toml` replaces the default policy; `args` go to `tcpgate run`.
    pub fn start_with(policy_toml: &str, args: &[&str]) -> Result<Self> {
        Self::start_launched(policy_toml, args, Launch::default())
    }

    /// Like [`AuthFixture::start_with`], with the agent started as `launch`
    /// says (another binary, files prepared for another user).
    pub fn start_launched(policy_toml: &str, args: &[&str], launch: Launch) -> Result<Self> {
        let topo = match launch.topology {
            Some(topo) => topo,
            None => Topology::new()?,
        };
        let keys = Keys::new();
        let jwks = JwksServer::start(&topo.bastion, "127.0.0.1:0".parse()?, keys.jwks())?;
        let (issuer, keys_from, policy_toml) = if launch.discovery {
            jwks.serve_discovery(&jwks.issuer());
            let policy =
                policy_toml.replace(&format!("{ISSUER:?}"), &format!("{:?}", jwks.issuer()));
            (jwks.issuer(), String::new(), policy)
        } else {
            let url = format!("jwks_url = {:?}\n", jwks.url());
            (ISSUER.to_owned(), url, policy_toml.to_owned())
        };
        let mut builder = Agent::builder(&topo.bastion)?;
        if let Some(binary) = launch.binary {
            builder = builder.binary(binary);
        }
        // A copy in the agent's own directory, which `launch.prepare` may
        // hand to the agent's user; the original is shared by the process.
        let ca = builder.dir().join("jwks-ca.pem");
        std::fs::copy(jwks.ca_file(), &ca).context("copy the JWKS CA certificate")?;
        let ports: Vec<String> = PORTS.iter().map(|p| format!("\"{p}\"")).collect();
        // HTTPS on both of the bastion's runner-facing addresses.
        let names = [BASTION_RUNNER_V4.to_string(), BASTION_RUNNER_V6.to_string()];
        let names = [names[0].as_str(), names[1].as_str()];
        let api_cert = if let Some(files) = launch.api_cert {
            files
        } else if launch.self_signed_api {
            crate::tls::self_signed(builder.dir(), "api", &names)
        } else {
            crate::tls::ca_signed(builder.dir(), "api", &names)
        };
        let config = format!(
            "[agent]\npin_dir = {pin:?}\n{agent_extra}\n[audit]\npath = {audit:?}\n\n\
             [intercept]\n{intercept_extra}\n[[intercept.prefix]]\nprefix = \"192.0.2.0/24\"\nports = [{ports}]\n\
             [[intercept.prefix]]\nprefix = \"2001:db8:2::/64\"\nports = [{ports}]\n\n\
             [auth]\npreamble_timeout = \"2s\"\naudit_claims = [\"project_path\", \"ref\", \"job_id\"]\n\
             [[auth.issuer]]\nissuer = {issuer:?}\naudience = {AUDIENCE:?}\n{keys_from}\
             ca_file = {ca:?}\nmin_refresh_interval = \"1s\"\n\n\
             [api]\nlisten = [\"{api}\", \"{api6}\"]\ntls_cert = {cert:?}\ntls_key = {key:?}\n{api_extra}\n\n\
             [admin]\nsocket = {admin:?}\n{admin_extra}\n{policy_toml}\n{sections}",
            pin = builder.pin_dir().display().to_string(),
            audit = builder.audit_path().display().to_string(),
            ports = ports.join(", "),
            ca = ca.display().to_string(),
            api = SocketAddr::from((BASTION_RUNNER_V4, API_PORT)),
            api6 = SocketAddr::from((BASTION_RUNNER_V6, API_PORT)),
            cert = api_cert.cert.display().to_string(),
            key = api_cert.key.display().to_string(),
            admin = builder.dir().join("admin.sock").display().to_string(),
            api_extra = launch.api_extra,
            admin_extra = launch.admin_extra,
            sections = launch.sections,
            intercept_extra = launch.intercept_extra,
            agent_extra = launch.agent_extra,
        );
        let builder = builder.config(config).args(args);
        if let Some(prepare) = launch.prepare {
            prepare(&builder)?;
        }
        let agent = builder.spawn()?;
        Ok(Self {
            api_ca: api_cert.trust,
            issuer,
            agent,
            jwks,
            keys,
            topo,
        })
    }

    /// The operator socket (`tcpgate revoke --admin <this>`).
    pub fn admin_socket(&self) -> std::path::PathBuf {
        self.agent.dir().join("admin.sock")
    }

    /// The grant API's URL on the bastion's runner-facing IPv4 address.
    pub fn api_url() -> String {
        format!(
            "https://{}",
            SocketAddr::from((BASTION_RUNNER_V4, API_PORT))
        )
    }

    /// The grant API's URL on the bastion's runner-facing IPv6 address.
    pub fn api_url_v6() -> String {
        format!(
            "https://{}",
            SocketAddr::from((BASTION_RUNNER_V6, API_PORT))
        )
    }

    /// A fresh GitLab-shaped token from the RSA key.
    pub fn token(&self) -> String {
        self.keys.rsa.sign(&gitlab_claims())
    }

    pub fn target(port: u16) -> SocketAddr {
        SocketAddr::from((TARGET_V4, port))
    }

    /// Dials `addr` from the runner namespace (plain blocking connect).
    pub fn dial_from_runner(&self, addr: SocketAddr) -> Result<TcpStream> {
        let stream = self.topo.runner.run(move || TcpStream::connect(addr))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(stream)
    }

    /// Writes a token file readable by the CLI.
    pub fn token_file(&self, token: &str) -> Result<std::path::PathBuf> {
        let path = self
            .agent
            .dir()
            .join(format!("token-{}.jwt", rand_suffix()));
        std::fs::write(&path, token)?;
        Ok(path)
    }

    /// Runs the `tcpgate` CLI inside `ns` and returns (status, stdout, stderr).
    pub fn cli(&self, ns: &crate::Netns, args: &[&str]) -> Result<(i32, String, String)> {
        let output = ns
            .command(self.agent.binary())
            .args(args)
            .output()
            .context("run tcpgate CLI")?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// `tcpgate grant` from the runner; returns the grant id.
    pub fn grant_from_runner(&self, token: &str, extra: &[&str]) -> Result<String> {
        let file = self.token_file(token)?;
        let api = Self::api_url();
        let ca = self.api_ca.to_str().context("utf-8 path")?;
        let mut args = vec![
            "grant",
            "--token-file",
            file.to_str().context("utf-8 path")?,
            "--api",
            &api,
            "--ca",
            ca,
            "--json",
        ];
        args.extend_from_slice(extra);
        let (status, stdout, stderr) = self.cli(&self.topo.runner, &args)?;
        ensure!(status == 0, "tcpgate grant failed ({status}): {stderr}");
        let grant: Value =
            serde_json::from_str(&stdout).with_context(|| format!("grant JSON: {stdout}"))?;
        grant["grant_id"]
            .as_str()
            .map(str::to_owned)
            .context("grant_id")
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Reads the agent's answer frame: (status, message).
pub fn read_answer(stream: &mut TcpStream) -> Result<(u8, String)> {
    Ok(crate::preamble::read_answer(stream)?)
}

/// Sends a preamble and returns the answer.
pub fn authenticate(stream: &mut TcpStream, token: &str) -> Result<(u8, String)> {
    Ok(crate::preamble::authenticate(stream, token)?)
}

/// An echo service on the target's port 9000 that first sends `greeting`
/// (empty: the client speaks first). Returns the peers it served.
pub fn echo_service(
    fx: &AuthFixture,
    greeting: &'static [u8],
) -> Result<crate::AcceptLoop<SocketAddr>> {
    Ok(crate::accept_loop(
        &fx.topo.target,
        AuthFixture::target(9000),
        100,
        move |mut stream, peer| {
            use std::io::{Read, Write};
            let _ = stream.write_all(greeting);
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            peer
        },
    )?)
}

/// A server on the target's 5432 that streams 64 KiB chunks to each client
/// until the connection breaks or `bound` has passed; each connection
/// yields the bytes it sent.
pub fn streamer(fx: &AuthFixture, bound: Duration) -> Result<crate::AcceptLoop<u64>> {
    use std::io::Write;
    Ok(crate::accept_loop(
        &fx.topo.target,
        AuthFixture::target(5432),
        10,
        move |mut stream, _| {
            let chunk = crate::Payload::new(1, 64 * 1024).to_vec();
            let mut sent = 0u64;
            let deadline = std::time::Instant::now() + bound;
            while std::time::Instant::now() < deadline && stream.write_all(&chunk).is_ok() {
                sent += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(5));
            }
            sent
        },
    )?)
}
