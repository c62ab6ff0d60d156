//! `grant_api_body`: arbitrary bytes as the JSON body of `POST /v1/grants`,
//! then `GrantRequest::parse`, then the policy's grant decision for a fixed
//! token of the `deploy-db` rule.
//!
//! A rejected body is a 400 `bad_request` naming the field; an accepted one
//! survives the client's encoding (`GrantRequest::new`) and serde unchanged;
//! and a granted destination never reaches outside what the rule allows.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use tcpgate::auth::api_types::{GrantRequest, ParsedGrantRequest};
use tcpgate::auth::destination::set_contains;
use tcpgate::auth::{Denial, Destination, ValidatedToken};

use crate::fixture::{GITLAB_ISSUER, WORLD, decision_time};

pub fn check(data: &[u8]) -> String {
    let request: GrantRequest = match serde_json::from_slice(data) {
        Ok(r) => r,
        Err(_) => return "json error".to_owned(),
    };
    let text = serde_json::to_string(&request).expect("a request serializes");
    let back: GrantRequest = serde_json::from_str(&text).expect("a serialized request parses");
    assert_eq!(back, request, "serde round trip");
    match request.parse() {
        Ok(parsed) => {
            let again = GrantRequest::new(parsed.destinations.as_deref(), parsed.lifetime)
                .parse()
                .expect("the client's encoding of a parsed request parses");
            assert_eq!(again, parsed, "client encoding round trip");
            format!("ok; {}", check_grant(&parsed))
        }
        Err(e) => {
            assert_eq!((e.status, e.error.as_str()), (400, "bad_request"));
            assert!(
                e.message.starts_with("destinations") || e.message.starts_with("lifetime: "),
                "the message names the field: {}",
                e.message
            );
            let field = e.message.split([':', '[']).next().unwrap_or_default();
            format!("bad_request ({field})")
        }
    }
}

/// A token that the `deploy-db` rule (15 minutes, 192.0.2.0/24 port 5432 and
/// 2001:db8::/64 ports 22, 8000-8099) applies to.
fn deploy_token() -> ValidatedToken {
    let claims = json!({
        "iss": GITLAB_ISSUER, "sub": "project_path:group/app:ref_type:tag:ref:release/2.0",
        "project_path": "group/app", "ref": "release/2.0", "ref_type": "tag",
        "ref_protected": "true", "project_id": "1042", "user_login": "alice",
    });
    ValidatedToken {
        issuer: GITLAB_ISSUER.to_owned(),
        subject: "fuzz".to_owned(),
        expires_at: decision_time() + Duration::from_secs(3600),
        claims: claims.as_object().cloned().unwrap_or_default(),
    }
}

fn check_grant(parsed: &ParsedGrantRequest) -> String {
    let policy = &WORLD.policy;
    let token = deploy_token();
    let now = decision_time();
    let decision = policy.decide_grant(&token, parsed.destinations.clone(), parsed.lifetime, now);
    match decision {
        Ok(d) => {
            let rule = policy
                .rules()
                .iter()
                .find(|r| r.name == d.rule)
                .expect("the decision names a rule");
            assert!(rule.applies_to(&token));
            let lifetime = parsed
                .lifetime
                .map_or(rule.max_lifetime, |l| l.min(rule.max_lifetime));
            assert!(d.expires_at <= now + lifetime && d.expires_at <= token.expires_at);
            if let Some(wanted) = &parsed.destinations {
                assert_eq!(&d.destinations, wanted, "the grant is what was asked");
            }
            for dest in &d.destinations {
                for addr in corners(dest) {
                    assert!(
                        set_contains(&rule.allow, addr),
                        "granted {addr} ({dest}) outside rule {}",
                        rule.name
                    );
                }
            }
            format!("granted by {}", d.rule)
        }
        Err(Denial::NoRuleMatched) => panic!("the deploy token always has applying rules"),
        Err(Denial::DestinationNotAllowed { .. }) => {
            assert!(
                parsed.destinations.is_some(),
                "a whole-rule grant is allowed"
            );
            "denied".to_owned()
        }
    }
}

/// The extreme addresses and ports of a destination: if the rule covers a
/// granted destination, it covers these.
fn corners(dest: &Destination) -> Vec<SocketAddr> {
    let net = dest.prefix;
    let mut addrs: Vec<IpAddr> = vec![net.network(), net.broadcast()];
    if let Some(mid) = net
        .subnets(net.prefix_len().saturating_add(1))
        .ok()
        .and_then(|mut s| s.nth(1))
    {
        addrs.push(mid.network());
    }
    let mut out = Vec::new();
    for ip in addrs {
        for r in &dest.ports {
            out.push(SocketAddr::new(ip, r.first));
            out.push(SocketAddr::new(ip, r.last));
        }
    }
    out
}
