//! Real keys made by the openssl CLI, JWKS documents built from them,
//! tokens signed with them, and GitLab-shaped claims. Shared by the auth
//! unit tests, the privileged integration tests and the benchmarks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

pub const ISSUER: &str = "https://gitlab.example.com";
pub const AUDIENCE: &str = "tcpgate";

/// Runs openssl with `args` in `dir`, failing the test with its stderr.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// PEM files of every key type, generated once per test binary, in a
/// directory removed when the process exits.
pub struct KeyFiles {
    pub rsa: Vec<u8>,
    pub rsa_public: Vec<u8>,
    pub rsa2: Vec<u8>,
    pub p256: Vec<u8>,
    pub p384: Vec<u8>,
    pub ed25519: Vec<u8>,
    pub ca_pem: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

pub fn key_files() -> &'static KeyFiles {
    static KEYS: OnceLock<KeyFiles> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = crate::at_exit::remove_dir_at_exit(tempfile::tempdir().expect("tempdir"));
        let d = dir.as_path();
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "rsa.pem",
            ],
        );
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "rsa2.pem",
            ],
        );
        openssl(
            d,
            &["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"],
        );
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "p256.pem",
            ],
        );
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-out",
                "p384.pem",
            ],
        );
        openssl(
            d,
            &["genpkey", "-algorithm", "ed25519", "-out", "ed25519.pem"],
        );
        // A private CA and a loopback server certificate for HTTPS JWKS.
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tcpgate test CA",
        ]);
        ca.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(d, &ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(d, &csr);
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext.cnf");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        let read = |name: &str| std::fs::read(d.join(name)).expect("read key file");
        KeyFiles {
            rsa: read("rsa.pem"),
            rsa_public: read("rsa.pub.pem"),
            rsa2: read("rsa2.pem"),
            p256: read("p256.pem"),
            p384: read("p384.pem"),
            ed25519: read("ed25519.pem"),
            ca_pem: d.join("ca.pem"),
            server_cert: d.join("server.pem"),
            server_key: d.join("server.key"),
        }
    })
}

/// A signing key with its kid and the algorithm its JWK declares.
#[derive(Clone)]
pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
}

impl TestKey {
    pub fn new(kid: &str, alg: Algorithm) -> TestKey {
        let k = key_files();
        let encoding = match alg {
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 => {
                EncodingKey::from_rsa_pem(&k.rsa)
            }
            Algorithm::ES256 => EncodingKey::from_ec_pem(&k.p256),
            Algorithm::ES384 => EncodingKey::from_ec_pem(&k.p384),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&k.ed25519),
            other => panic!("no test key for {other:?}"),
        }
        .expect("load signing key");
        TestKey {
            kid: kid.to_owned(),
            alg,
            encoding,
        }
    }

    /// The second RSA key pair, for rotation.
    pub fn rsa2(kid: &str) -> TestKey {
        let encoding = EncodingKey::from_rsa_pem(&key_files().rsa2).expect("load rsa2");
        TestKey {
            kid: kid.to_owned(),
            alg: Algorithm::RS256,
            encoding,
        }
    }

    /// The public JWK, as a JWKS would publish it (with `kid`, `alg`, `use`).
    pub fn jwk(&self) -> Value {
        let mut jwk = Jwk::from_encoding_key(&self.encoding, self.alg).expect("jwk from key");
        jwk.common.key_id = Some(self.kid.clone());
        let mut v = serde_json::to_value(&jwk).expect("jwk json");
        v["use"] = json!("sig");
        v
    }

    /// Signs `claims` with this key, header `alg` and `kid` as declared.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(self.alg, claims)
    }

    /// Signs with an explicit header algorithm (same key material).
    pub fn sign_as(&self, alg: Algorithm, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign token")
    }
}

pub fn jwks(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// The claim set of a GitLab CI `id_tokens` JWT for a protected release tag
/// deploy job. GitLab sends ids and booleans as strings (`runner_id` is the
/// one number); `exp` is five minutes out.
pub fn gitlab_claims() -> Value {
    let now = unix_now();
    json!({
        "namespace_id": "72",
        "namespace_path": "group",
        "project_id": "1042",
        "project_path": "group/app",
        "user_id": "17",
        "user_login": "alice",
        "user_email": "alice@example.com",
        "pipeline_id": "99123",
        "pipeline_source": "push",
        "job_id": "1234567",
        "job_project_path": "group/app",
        "ref": "release/1.4",
        "ref_type": "branch",
        "ref_protected": "true",
        "environment": "production",
        "environment_protected": "true",
        "runner_id": 31,
        "runner_environment": "self-hosted",
        "sha": "714a629c0b401fdce83e847fc9589983fc6f46bc",
        "ci_config_ref_uri": "gitlab.example.com/group/app//.gitlab-ci.yml@refs/heads/release/1.4",
        "ci_config_sha": "714a629c0b401fdce83e847fc9589983fc6f46bc",
        "project_visibility": "private",
        "jti": "63ab75f4-2606-4f0e-a500-86f90ab13a85",
        "iss": ISSUER,
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
        "sub": "project_path:group/app:ref_type:branch:ref:release/1.4",
        "aud": AUDIENCE,
    })
}

/// `gitlab_claims()` with fields replaced (`Value::Null` removes one).
pub fn claims_with(changes: &[(&str, Value)]) -> Value {
    let mut c = gitlab_claims();
    let map: &mut Map<String, Value> = c.as_object_mut().expect("object");
    for (k, v) in changes {
        if v.is_null() {
            map.remove(*k);
        } else {
            map.insert((*k).to_owned(), v.clone());
        }
    }
    c
}
