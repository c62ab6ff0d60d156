//! A tiny HTTP/1.1 server on loopback, optionally behind TLS with the test
//! CA's certificate, that records requests and answers a settable reply.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::key_files;

/// One HTTP request as a test server saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub head: String,
    pub body: Vec<u8>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// What a test server answers: status and body (JSON content type).
pub type Reply = Arc<Mutex<(u16, String)>>;

/// Replies for particular paths, checked before the default [`Reply`].
pub type Routes = Arc<Mutex<HashMap<String, (u16, String)>>>;

/// A one-request-per-connection HTTP/1.1 server on 127.0.0.1, optionally
/// behind TLS. Counts requests; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub reply: Reply,
    pub routes: Routes,
    pub hits: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<SeenRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub async fn start(tls: bool, status: u16, body: &str) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let reply: Reply = Arc::new(Mutex::new((status, body.to_owned())));
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let routes: Routes = Arc::default();
        let acceptor = tls.then(tls_acceptor);
        let (r, h, s) = (reply.clone(), hits.clone(), seen.clone());
        let rt = routes.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (r, h, s, acceptor) = (r.clone(), h.clone(), s.clone(), acceptor.clone());
                let rt = rt.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(stream) = a.accept(tcp).await {
                                serve_one(stream, r, rt, h, s).await;
                            }
                        }
                        None => serve_one(tcp, r, rt, h, s).await,
                    }
                });
            }
        });
        TestServer {
            addr,
            reply,
            routes,
            hits,
            seen,
            task,
        }
    }

    pub fn set_reply(&self, status: u16, body: &str) {
        *self.reply.lock().expect("reply lock") = (status, body.to_owned());
    }

    /// Answers requests for `path` with this reply instead of the default.
    pub fn set_route(&self, path: &str, status: u16, body: &str) {
        self.routes
            .lock()
            .expect("routes lock")
            .insert(path.to_owned(), (status, body.to_owned()));
    }

    /// The paths requested so far, in order.
    pub fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("seen lock")
            .iter()
            .filter_map(|r| r.head.split(' ').nth(1).map(str::to_owned))
            .collect()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let k = key_files();
    let certs = vec![CertificateDer::from_pem_file(&k.server_cert).expect("server cert")];
    let key = PrivateKeyDer::from_pem_file(&k.server_key).expect("server key");
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server tls config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn serve_one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    reply: Reply,
    routes: Routes,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut request = SeenRequest {
        head,
        body: buf[head_end..].to_vec(),
    };
    let len: usize = request
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while request.body.len() < len {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.body.extend_from_slice(&chunk[..n]),
        }
    }
    hits.fetch_add(1, Ordering::SeqCst);
    let path = request
        .head
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    seen.lock().expect("seen lock").push(request);
    let routed = routes.lock().expect("routes lock").get(&path).cloned();
    let (status, body) = routed.unwrap_or_else(|| reply.lock().expect("reply lock").clone());
    let response = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
