//! A token's audit claims, shared by its grant and by every line of every
//! session it admits, and turned into a line's JSON once.
//!
//! Every session writes two lines with the same claims. Escaping them into
//! JSON and checking each against [`MAX_FIELD`] was a tenth of the routed
//! agent's time per flow; both now happen when the claims are made.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

use super::MAX_FIELD;
use super::bound::truncate;

/// Claim path → value, as the token had it. Cheap to clone.
#[derive(Clone, Default)]
pub struct AuditClaims(Option<Arc<Shared>>);

struct Shared {
    map: BTreeMap<String, Value>,
    /// `map` as an audit line writes it: each claim cut to [`MAX_FIELD`].
    line: Box<RawValue>,
}

static EMPTY: BTreeMap<String, Value> = BTreeMap::new();

impl AuditClaims {
    #[must_use]
    pub fn new(map: BTreeMap<String, Value>) -> Self {
        if map.is_empty() {
            return Self::default();
        }
        let line = if map.values().any(too_long) {
            let mut bounded = map.clone();
            bounded.values_mut().for_each(truncate_value);
            to_raw(&bounded)
        } else {
            to_raw(&map)
        };
        Self(Some(Arc::new(Shared { map, line })))
    }

    /// The same claims, not a copy (sessions share their grant's).
    #[must_use]
    pub fn ptr_eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    /// Writes the claims as an audit line has them (cut, already JSON).
    pub(super) fn serialize_line<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(shared) => shared.line.serialize(serializer),
            None => EMPTY.serialize(serializer),
        }
    }
}

/// A map of strings and JSON values never fails to serialize; if it ever
/// did, the line says so instead of losing the session's other fields.
fn to_raw(map: &BTreeMap<String, Value>) -> Box<RawValue> {
    serde_json::value::to_raw_value(map).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot serialise audit claims");
        serde_json::value::to_raw_value(&"unserialisable").unwrap_or_default()
    })
}

impl From<BTreeMap<String, Value>> for AuditClaims {
    fn from(map: BTreeMap<String, Value>) -> Self {
        Self::new(map)
    }
}

impl Deref for AuditClaims {
    type Target = BTreeMap<String, Value>;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().map_or(&EMPTY, |shared| &shared.map)
    }
}

impl PartialEq for AuditClaims {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for AuditClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// The claims whole (the grant API shows what the token said).
impl Serialize for AuditClaims {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(serializer)
    }
}

/// A claim [`too_long`] becomes a string cut to [`MAX_FIELD`] (an array or
/// object as its JSON text).
fn truncate_value(value: &mut Value) {
    if !too_long(value) {
        return;
    }
    let text = match std::mem::take(value) {
        Value::String(s) => s,
        other => other.to_string(),
    };
    *value = Value::String(truncate(text, MAX_FIELD));
}

/// Whether a claim is longer than [`MAX_FIELD`] (an array or object by
/// its JSON text); numbers and booleans are short.
fn too_long(value: &Value) -> bool {
    match value {
        Value::String(s) => s.len() > MAX_FIELD,
        Value::Array(_) | Value::Object(_) => value.to_string().len() > MAX_FIELD,
        _ => false,
    }
}
