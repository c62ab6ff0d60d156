//! An HTTPS server for a JWKS document, inside a namespace: the agent
//! fetches its keys from it the way it fetches GitLab's
//! `/oauth/discovery/keys`. The document can be replaced (key rotation) and
//! requests are counted (refresh rate limits).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::netns::Netns;
use crate::servers::{ServerError, bind};
use crate::tokens::key_files;

/// Path the document is served at (any path answers with it, except
/// [`DISCOVERY_PATH`] once an OIDC discovery document is set).
pub const JWKS_PATH: &str = "/oauth/discovery/keys";
/// Where OIDC discovery looks, below the issuer URL.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// A running JWKS server; stops when dropped.
pub struct JwksServer {
    addr: SocketAddr,
    document: Arc<Mutex<String>>,
    discovery: Arc<Mutex<Option<String>>>,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl JwksServer {
    /// Serves `document` over HTTPS on `addr` (use `127.0.0.1:0` inside the
    /// agent's namespace; the certificate is valid for 127.0.0.1).
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        document: String,
    ) -> Result<JwksServer, ServerError> {
        let listener = bind(ns, addr)?;
        let local = listener.local_addr().map_err(|source| ServerError::Bind {
            netns: ns.name().to_owned(),
            addr,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Bind {
                netns: ns.name().to_owned(),
                addr,
                source,
            })?;
        let document = Arc::new(Mutex::new(document));
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let discovery = Arc::new(Mutex::new(None));
        let config = server_config();
        let docs = Documents {
            jwks: Arc::clone(&document),
            discovery: Arc::clone(&discovery),
        };
        let (count, halt) = (Arc::clone(&hits), Arc::clone(&stop));
        let thread = thread::Builder::new()
            .name(format!("jwks-{local}"))
            .spawn(move || serve(&listener, &config, &docs, &count, &halt))
            .map_err(ServerError::Thread)?;
        Ok(JwksServer {
            addr: local,
            document,
            discovery,
            hits,
            stop,
            thread: Some(thread),
        })
    }

    /// The URL to put in `jwks_url`.
    pub fn url(&self) -> String {
        format!("https://{}{JWKS_PATH}", self.addr)
    }

    /// The CA certificate to put in `ca_file`.
    pub fn ca_file(&self) -> std::path::PathBuf {
        key_files().ca_pem.clone()
    }

    /// Replaces the served document (key rotation).
    pub fn set_document(&self, document: String) {
        *self.document.lock().unwrap_or_else(PoisonError::into_inner) = document;
    }

    /// This server as an OIDC issuer: the URL whose discovery document it
    /// serves once [`JwksServer::serve_discovery`] is called.
    pub fn issuer(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Serves an OIDC discovery document at [`DISCOVERY_PATH`] that names
    /// `issuer` (normally [`JwksServer::issuer`]; another one to test the
    /// refusal) and this server's JWKS as `jwks_uri`.
    pub fn serve_discovery(&self, issuer: &str) {
        let doc = serde_json::json!({
            "issuer": issuer,
            "jwks_uri": self.url(),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        });
        *self
            .discovery
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(doc.to_string());
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn server_config() -> Arc<rustls::ServerConfig> {
    let keys = key_files();
    let cert = CertificateDer::from_pem_file(&keys.server_cert).expect("test server certificate");
    let key = PrivateKeyDer::from_pem_file(&keys.server_key).expect("test server key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .expect("test TLS config");
    Arc::new(config)
}

/// What the server answers: the JWKS, and the discovery document if set.
struct Documents {
    jwks: Arc<Mutex<String>>,
    discovery: Arc<Mutex<Option<String>>>,
}

impl Documents {
    fn for_path(&self, path: &str) -> String {
        let discovery = self
            .discovery
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match discovery {
            Some(doc) if path == DISCOVERY_PATH => doc,
            _ => self
                .jwks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

fn serve(
    listener: &TcpListener,
    config: &Arc<rustls::ServerConfig>,
    docs: &Documents,
    hits: &AtomicUsize,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        let tcp = match listener.accept() {
            Ok((tcp, _)) => tcp,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => return,
        };
        let _ = tcp.set_nonblocking(false);
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
        let Ok(conn) = rustls::ServerConnection::new(Arc::clone(config)) else {
            continue;
        };
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut reader = BufReader::new(&mut tls);
        let mut line = String::new();
        let mut complete = false;
        let mut path = None;
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line == "\r\n" || line == "\n" {
                complete = true;
                break;
            }
            // The request line: `GET /path HTTP/1.1`.
            if path.is_none() {
                path = Some(line.split(' ').nth(1).unwrap_or_default().to_owned());
            }
            line.clear();
        }
        drop(reader);
        if !complete {
            continue;
        }
        hits.fetch_add(1, Ordering::SeqCst);
        let body = docs.for_path(path.as_deref().unwrap_or_default());
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tls.write_all(response.as_bytes());
        let _ = tls.flush();
        tls.conn.send_close_notify();
        let _ = tls.flush();
    }
}
