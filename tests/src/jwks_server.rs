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

/// Path the document is served at (any path answers with it).
pub const JWKS_PATH: &str = "/oauth/discovery/keys";

/// A running JWKS server; stops when dropped.
pub struct JwksServer {
    addr: SocketAddr,
    document: Arc<Mutex<String>>,
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
        let config = server_config();
        let (doc, count, halt) = (Arc::clone(&document), Arc::clone(&hits), Arc::clone(&stop));
        let thread = thread::Builder::new()
            .name(format!("jwks-{local}"))
            .spawn(move || serve(&listener, &config, &doc, &count, &halt))
            .map_err(ServerError::Thread)?;
        Ok(JwksServer {
            addr: local,
            document,
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

fn serve(
    listener: &TcpListener,
    config: &Arc<rustls::ServerConfig>,
    doc: &Mutex<String>,
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
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line == "\r\n" || line == "\n" {
                complete = true;
                break;
            }
            line.clear();
        }
        drop(reader);
        if !complete {
            continue;
        }
        hits.fetch_add(1, Ordering::SeqCst);
        let body = doc.lock().unwrap_or_else(PoisonError::into_inner).clone();
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
