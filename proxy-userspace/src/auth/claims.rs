//! Claim paths: how a policy rule names a claim inside nested objects.
//!
//! A path is dot-separated (`kubernetes.io.namespace`). Claim names may
//! themselves contain dots (Kubernetes puts everything under the key
//! `kubernetes.io`), so each level resolves **longest key first**: the
//! whole remaining path as one key, then the part up to its last dot, and so
//! on; the first key present wins and the rest of the path is looked up
//! inside its value. There is no backtracking: when `kubernetes.io` exists
//! and holds no `namespace`, the path does not match, even if a `kubernetes`
//! key exists too. A plain name without dots is just a top-level claim, as
//! before paths existed.

use serde_json::{Map, Value};

/// The value at `path` in `claims`, resolved longest key first.
#[must_use]
pub fn lookup<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let mut end = path.len();
    while let Some(dot) = path[..end].rfind('.') {
        if let Some(v) = claims.get(&path[..dot]) {
            return match v {
                Value::Object(inner) => lookup(inner, &path[dot + 1..]),
                _ => None,
            };
        }
        end = dot;
    }
    None
}

/// Why a claim path in a rule's `match` table is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("claim names must not be empty")]
    Empty,
    #[error("claim path `{0}` has an empty segment (a leading, trailing or double dot)")]
    EmptySegment(String),
}

/// Checks a claim path from the config.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if path.trim().is_empty() {
        return Err(PathError::Empty);
    }
    if path.split('.').any(str::is_empty) {
        return Err(PathError::EmptySegment(path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    #[test]
    fn nested_paths_and_dotted_keys_resolve_longest_key_first() {
        let c = claims(json!({
            "sub": "system:serviceaccount:ci:deployer",
            "kubernetes.io": {
                "namespace": "ci",
                "serviceaccount": { "name": "deployer", "uid": "u-1" },
            },
            "a": { "b": { "c": 1 } },
            "a.b": { "c": 2 },
            "x.y": 3,
        }));
        assert_eq!(
            lookup(&c, "sub"),
            Some(&json!("system:serviceaccount:ci:deployer"))
        );
        assert_eq!(lookup(&c, "kubernetes.io.namespace"), Some(&json!("ci")));
        assert_eq!(
            lookup(&c, "kubernetes.io.serviceaccount.name"),
            Some(&json!("deployer"))
        );
        // `a.b` is a key of its own: it wins over `a` → `b`.
        assert_eq!(lookup(&c, "a.b.c"), Some(&json!(2)));
        // A top-level key with a dot still matches by its whole name.
        assert_eq!(lookup(&c, "x.y"), Some(&json!(3)));
        // No backtracking: `kubernetes.io` exists, so `kubernetes` is not tried.
        assert_eq!(lookup(&c, "kubernetes.io.pod.name"), None);
        // A path through a scalar or to a missing key finds nothing.
        assert_eq!(lookup(&c, "sub.x"), None);
        assert_eq!(lookup(&c, "missing"), None);
        assert_eq!(lookup(&c, "kubernetes"), None);
    }

    #[test]
    fn empty_segments_are_rejected() {
        assert_eq!(check_path(""), Err(PathError::Empty));
        assert!(check_path("a..b").is_err());
        assert!(check_path(".a").is_err());
        assert!(check_path("a.").is_err());
        assert!(check_path("kubernetes.io.namespace").is_ok());
    }
}
