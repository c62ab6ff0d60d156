//! Bounds on the strings a peer chooses (subject, claims, details).

use super::{AuditEvent, MAX_DETAIL, MAX_FIELD};

/// Cuts `text` to at most `max` bytes at a character boundary, saying so.
#[must_use]
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("...[{total} bytes]"));
    text
}

/// A claim [`too_long`] becomes a string cut to [`MAX_FIELD`] (an array or
/// object as its JSON text).
fn truncate_value(value: &mut serde_json::Value) {
    if !too_long(value) {
        return;
    }
    let text = match std::mem::take(value) {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    *value = serde_json::Value::String(truncate(text, MAX_FIELD));
}

/// Bounds the fields a peer chooses.
pub(super) fn bound(event: &mut AuditEvent) {
    if let Some(subject) = event.subject.take() {
        event.subject = Some(truncate(subject, MAX_FIELD));
    }
    if let Some(detail) = event.detail.take() {
        event.detail = Some(truncate(detail, MAX_DETAIL));
    }
    // Shared claims are copied only when one of them must be cut.
    if event.claims.values().any(too_long) {
        std::sync::Arc::make_mut(&mut event.claims)
            .values_mut()
            .for_each(truncate_value);
    }
}

/// Whether a claim is longer than [`MAX_FIELD`] (an array or object by
/// its JSON text); numbers and booleans are short.
fn too_long(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.len() > MAX_FIELD,
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
            value.to_string().len() > MAX_FIELD
        }
        _ => false,
    }
}
