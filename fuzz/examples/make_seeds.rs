//! Regenerates `fixtures/jwks.json` from the fixture keys and the generated
//! seeds of the `preamble` and `token_claims` corpora (signed tokens cannot
//! be written by hand). Run from `fuzz/`:
//!
//! ```text
//! cargo run --example make_seeds
//! ```
//!
//! The other corpora (`config`, `grant_api_body`) are plain text files kept
//! by hand. Tokens expire in 2100, so the seeds stay valid.

use std::path::Path;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tcpgate::auth::preamble::{Status, encode_preamble, encode_response};

const GITLAB: &str = "https://gitlab.example.com";
const DEV: &str = "https://dev.example.com";
const FAR_FUTURE: u64 = 4_102_444_800; // 2100-01-01
const ISSUED: u64 = 1_700_000_000;

struct Key {
    kid: &'static str,
    alg: Algorithm,
    encoding: EncodingKey,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fixtures = Path::new("fixtures");
    let pem = |name: &str| std::fs::read(fixtures.join(name));
    let keys = [
        Key {
            kid: "rsa-1",
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_pem(&pem("rsa.pem")?)?,
        },
        Key {
            kid: "ec-1",
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_pem(&pem("p256.pem")?)?,
        },
        Key {
            kid: "ed-1",
            alg: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_pem(&pem("ed25519.pem")?)?,
        },
    ];
    let mut jwks = Vec::new();
    for k in &keys {
        let mut jwk = Jwk::from_encoding_key(&k.encoding, k.alg)?;
        jwk.common.key_id = Some(k.kid.to_owned());
        let mut v = serde_json::to_value(&jwk)?;
        v["use"] = json!("sig");
        jwks.push(v);
    }
    std::fs::write(
        fixtures.join("jwks.json"),
        serde_json::to_string_pretty(&json!({ "keys": jwks }))? + "\n",
    )?;
    let secret = std::fs::read_to_string(fixtures.join("hs256.secret"))?;
    let hs256 = Key {
        kid: "dev",
        alg: Algorithm::HS256,
        encoding: EncodingKey::from_secret(secret.trim().as_bytes()),
    };

    let tokens = Path::new("corpus/token_claims");
    std::fs::create_dir_all(tokens)?;
    let put = |name: &str, bytes: &[u8]| std::fs::write(tokens.join(name), bytes);
    let [rsa, ec, ed] = &keys;
    let deploy = gitlab_claims("release/1.4", "branch");
    put("rs256-valid.jwt", sign(rsa, rsa.alg, &deploy)?.as_bytes())?;
    put(
        "es256-valid-tag.jwt",
        sign(ec, ec.alg, &gitlab_claims("release/2.0", "tag"))?.as_bytes(),
    )?;
    put(
        "eddsa-valid-feature.jwt",
        sign(ed, ed.alg, &gitlab_claims("feature/[x]{a,b}!z-1", "branch"))?.as_bytes(),
    )?;
    let dev = json!({"iss": DEV, "aud": "tcpgate-dev", "sub": "dev:bob", "exp": FAR_FUTURE, "iat": ISSUED});
    put(
        "hs256-dev-valid.jwt",
        sign(&hs256, Algorithm::HS256, &dev)?.as_bytes(),
    )?;
    put(
        "hs256-on-gitlab.jwt",
        sign(&hs256, Algorithm::HS256, &deploy)?.as_bytes(),
    )?;
    put(
        "expired.jwt",
        sign(rsa, rsa.alg, &with(&deploy, "exp", json!(1_600_000_000)))?.as_bytes(),
    )?;
    put(
        "not-yet-valid.jwt",
        sign(ec, ec.alg, &with(&deploy, "nbf", json!(FAR_FUTURE - 10)))?.as_bytes(),
    )?;
    put(
        "wrong-audience.jwt",
        sign(rsa, rsa.alg, &with(&deploy, "aud", json!(["other", "x"])))?.as_bytes(),
    )?;
    put(
        "rs256-as-ps256.jwt",
        sign(rsa, Algorithm::PS256, &deploy)?.as_bytes(),
    )?;
    let unknown = Key {
        kid: "rotated-away",
        alg: Algorithm::RS256,
        encoding: rsa.encoding.clone(),
    };
    put(
        "unknown-kid.jwt",
        sign(&unknown, unknown.alg, &deploy)?.as_bytes(),
    )?;
    let mut tampered = sign(ed, ed.alg, &deploy)?;
    tampered.replace_range(tampered.len() - 4.., "AAAA");
    put("bad-signature.jwt", tampered.as_bytes())?;
    put(
        "alg-none.jwt",
        format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&deploy)).as_bytes(),
    )?;
    // `#` inputs: header, payload and signature as raw bytes.
    let structured = |header: &Value, payload: &Value, sig: &[u8]| {
        let mut v = vec![b'#'];
        v.extend(header.to_string().as_bytes());
        v.push(0xff);
        v.extend(payload.to_string().as_bytes());
        v.push(0xff);
        v.extend(sig);
        v
    };
    put(
        "structured-rs256.bin",
        &structured(
            &json!({"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}),
            &deploy,
            b"sig",
        ),
    )?;
    put(
        "structured-crit.bin",
        &structured(
            &json!({"alg": "ES256", "kid": "ec-1", "crit": ["exp"]}),
            &deploy,
            b"",
        ),
    )?;
    put(
        "structured-dev.bin",
        &structured(&json!({"alg": "HS256"}), &dev, &[0; 32]),
    )?;
    // `{` inputs: claim sets decided by the policy.
    put("claims-deploy.json", deploy.to_string().as_bytes())?;
    let web =
        json!({"iss": GITLAB, "pipeline_source": "web", "namespace_id": 72, "user_login": "alice"});
    put("claims-web.json", web.to_string().as_bytes())?;
    let web_glob =
        json!({"iss": "https://other.example", "pipeline_source": "v1.0", "namespace_id": "72"});
    put("claims-other-issuer.json", web_glob.to_string().as_bytes())?;
    put("claims-dev.json", dev.to_string().as_bytes())?;
    // `*` inputs: pattern, 0xff, value.
    for (name, pattern, value) in [
        ("glob-release.bin", "release/*", "release/1.4/hotfix"),
        ("glob-question.bin", "v?.0", "v1.0"),
        (
            "glob-literal.bin",
            "feature/[x]{a,b}!?*",
            "feature/[x]{a,b}!z",
        ),
        ("glob-exact.bin", "main", "main"),
    ] {
        let mut v = vec![b'*'];
        v.extend(pattern.as_bytes());
        v.push(0xff);
        v.extend(value.as_bytes());
        put(name, &v)?;
    }

    let preambles = Path::new("corpus/preamble");
    std::fs::create_dir_all(preambles)?;
    let put = |name: &str, bytes: &[u8]| std::fs::write(preambles.join(name), bytes);
    let jwt = sign(rsa, rsa.alg, &deploy)?;
    let request = encode_preamble(&jwt)?;
    put("request-jwt.bin", &request)?;
    let mut followed = encode_preamble("t0ken")?;
    followed.extend(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"); // a PostgreSQL SSLRequest
    put("request-then-client-bytes.bin", &followed)?;
    put("request-header-only.bin", &request[..8])?;
    put("request-truncated-body.bin", &request[..request.len() / 2])?;
    put("request-truncated-magic.bin", b"TCP")?;
    put("request-empty-token.bin", b"TCPG\x01\x00\x00\x00")?;
    put("request-oversized.bin", b"TCPG\x01\x00\xff\xffeyJ")?;
    put("request-bad-version.bin", b"TCPG\x02\x00\x00\x01a")?;
    put("request-bad-flags.bin", b"TCPG\x01\x80\x00\x01a")?;
    put("request-not-utf8.bin", b"TCPG\x01\x00\x00\x02\xc3\x28")?;
    put("not-a-preamble.bin", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    put("response-ok.bin", &encode_response(Status::Ok, ""))?;
    put(
        "response-denied.bin",
        &encode_response(Status::Denied, "no policy rule matches this token"),
    )?;
    put(
        "response-error.bin",
        &encode_response(Status::Error, "token expired"),
    )?;
    put("response-bad-status.bin", b"TCPG\x01\x03\x00\x00")?;
    put(
        "response-long.bin",
        &encode_response(Status::Denied, &"é".repeat(600)),
    )?;
    Ok(())
}

fn gitlab_claims(git_ref: &str, ref_type: &str) -> Value {
    json!({
        "namespace_id": "72", "namespace_path": "group", "project_id": "1042",
        "project_path": "group/app", "user_id": "17", "user_login": "alice",
        "pipeline_id": "99123", "pipeline_source": "push", "job_id": "1234567",
        "ref": git_ref, "ref_type": ref_type, "ref_protected": "true",
        "environment": "production", "environment_protected": "false", "runner_id": 31,
        "iss": GITLAB, "aud": "tcpgate", "iat": ISSUED, "nbf": ISSUED, "exp": FAR_FUTURE,
        "sub": format!("project_path:group/app:ref_type:{ref_type}:ref:{git_ref}"),
    })
}

fn with(claims: &Value, key: &str, value: Value) -> Value {
    let mut c = claims.clone();
    c[key] = value;
    c
}

fn sign(key: &Key, alg: Algorithm, claims: &Value) -> Result<String, jsonwebtoken::errors::Error> {
    let mut header = Header::new(alg);
    header.kid = Some(key.kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key.encoding)
}

fn b64(v: &Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}
