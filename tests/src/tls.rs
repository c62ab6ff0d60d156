//! Certificates for the agent's grant API, made by the openssl CLI the way
//! an operator would: a leaf signed by the test CA, with the bastion's
//! addresses as IP subjectAltNames, or a plain `openssl req -x509`
//! self-signed certificate.

use std::path::{Path, PathBuf};

use crate::tokens::{key_files, openssl};

/// A certificate, its key, and the file a client should trust for it.
#[derive(Debug, Clone)]
pub struct ApiCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA certificate (for a CA-signed leaf) or the certificate itself
    /// (self-signed).
    pub trust: PathBuf,
}

fn san(addrs: &[&str]) -> String {
    let names: Vec<String> = addrs
        .iter()
        .map(|a| {
            if a.parse::<std::net::IpAddr>().is_ok() {
                format!("IP:{a}")
            } else {
                format!("DNS:{a}")
            }
        })
        .collect();
    format!("subjectAltName={}", names.join(","))
}

/// What a leaf certificate is for (its extendedKeyUsage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (the grant API).
    Server,
    /// A TLS client (a bastion showing etcd who it is).
    Client,
    /// Both: etcd's members, whose gateway dials the member itself with
    /// the server certificate.
    ServerAndClient,
}

impl Usage {
    fn extended_key_usage(self) -> &'static str {
        match self {
            Self::Server => "serverAuth",
            Self::Client => "clientAuth",
            Self::ServerAndClient => "serverAuth,clientAuth",
        }
    }
}

/// A certificate authority: its certificate and key.
#[derive(Debug, Clone)]
pub struct Ca {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A leaf for `names` (IP addresses or DNS names) signed by the shared
/// test CA, written to `dir` as `<stem>.pem` / `<stem>.key`.
pub fn ca_signed(dir: &Path, stem: &str, names: &[&str]) -> ApiCert {
    Ca::shared().leaf(dir, stem, names, Usage::Server)
}

impl Ca {
    /// The test CA shared by the process (the one JWKS and API leaves
    /// come from).
    #[must_use]
    pub fn shared() -> Ca {
        let cert = key_files().ca_pem.clone();
        Ca {
            key: cert.with_file_name("ca.key"),
            cert,
        }
    }

    /// A CA of its own in `dir` (`<stem>.pem` / `<stem>.key`), trusted by
    /// nobody else: what an attacker's certificates come from.
    #[must_use]
    pub fn new(dir: &Path, stem: &str) -> Ca {
        let (cert, key) = req_x509(
            dir,
            stem,
            &format!("/CN=tcpgate test CA {stem}"),
            &[
                "basicConstraints=critical,CA:TRUE",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Ca { cert, key }
    }

    /// A leaf for `names` signed by this CA, for `usage`, written to `dir`
    /// as `<stem>.pem` / `<stem>.key`.
    #[must_use]
    pub fn leaf(&self, dir: &Path, stem: &str, names: &[&str], usage: Usage) -> ApiCert {
        let (cert, key, csr, ext, srl) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
            dir.join(format!("{stem}.csr")),
            dir.join(format!("{stem}.ext")),
            dir.join(format!("{stem}.srl")),
        );
        std::fs::write(
            &ext,
            format!(
                "{}basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage={}\n",
                // A client certificate may name nothing.
                if names.is_empty() {
                    String::new()
                } else {
                    san(names) + "\n"
                },
                usage.extended_key_usage()
            ),
        )
        .expect("write the extensions file");
        let s = |p: &Path| p.display().to_string();
        openssl(
            dir,
            &[
                &["req"][..],
                &NEW_P256_KEY,
                &[
                    "-keyout",
                    &s(&key),
                    "-out",
                    &s(&csr),
                    "-subj",
                    &format!("/CN=tcpgate {stem}"),
                ],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &s(&csr),
                "-CA",
                &s(&self.cert),
                "-CAkey",
                &s(&self.key),
                // A serial file of this certificate's own: the shared CA is
                // used by tests running in parallel, and its default
                // `ca.srl` beside it would be read and rewritten by several
                // openssl at once.
                "-CAserial",
                &s(&srl),
                "-CAcreateserial",
                "-out",
                &s(&cert),
                "-days",
                "2",
                "-extfile",
                &s(&ext),
            ],
        );
        ApiCert {
            cert,
            key,
            trust: self.cert.clone(),
        }
    }
}

/// What people make first: `openssl req -x509` with openssl's default
/// extensions (so `CA:TRUE`) and the bastion's names as subjectAltName.
pub fn self_signed(dir: &Path, stem: &str, names: &[&str]) -> ApiCert {
    let (cert, key) = req_x509(dir, stem, "/CN=bastion", &[&san(names)]);
    ApiCert {
        trust: cert.clone(),
        cert,
        key,
    }
}

/// `openssl req` arguments for a new P-256 key, unencrypted.
const NEW_P256_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// `openssl req -x509` for a new P-256 key, valid two days, with `subject`
/// and each of `extensions` as an `-addext`: `<stem>.pem` and `<stem>.key`
/// in `dir`.
fn req_x509(dir: &Path, stem: &str, subject: &str, extensions: &[&str]) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let mut args = [&["req", "-x509"][..], &NEW_P256_KEY].concat();
    args.extend([
        "-keyout", &key_s, "-out", &cert_s, "-days", "2", "-subj", subject,
    ]);
    for &extension in extensions {
        args.extend(["-addext", extension]);
    }
    openssl(dir, &args);
    (cert, key)
}

/// A TLS client stream over `tcp`, trusting only `ca`, for `server` (an IP
/// address or DNS name in the server's certificate).
pub fn client(
    tcp: std::net::TcpStream,
    ca: &Path,
    server: &str,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let invalid = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| invalid(&e))? {
        roots
            .add(cert.map_err(|e| invalid(&e))?)
            .map_err(|e| invalid(&e))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name =
        rustls::pki_types::ServerName::try_from(server.to_owned()).map_err(|e| invalid(&e))?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(|e| invalid(&e))?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}
