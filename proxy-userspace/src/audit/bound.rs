//! Bounds on the strings a peer chooses (subject, details; claims are
//! bounded in `claims`).

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

/// Bounds the fields a peer chooses.
pub(super) fn bound(event: &mut AuditEvent) {
    if let Some(subject) = event.subject.take() {
        event.subject = Some(truncate(subject, MAX_FIELD));
    }
    if let Some(detail) = event.detail.take() {
        event.detail = Some(truncate(detail, MAX_DETAIL));
    }
    // The claims were cut when they were made (`AuditClaims::new`).
}
