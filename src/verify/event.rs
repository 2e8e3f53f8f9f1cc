//! Event names and delivery ids, whichever provider sent them: the checks that keep
//! them safe as routing keys, metric labels and header values.

use std::borrow::Cow;

/// Longest event name accepted, in bytes.
pub const MAX_EVENT_BYTES: usize = 128;
/// Longest delivery id accepted, in bytes (longer ones are ignored, not refused).
pub const MAX_DELIVERY_ID_BYTES: usize = 256;

/// Where a provider reads its event name: the reason counted for a bad one follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    /// A request header, named here as users see it (`X-GitHub-Event`).
    Header(&'static str),
    /// A field of the body (`type`).
    Body(&'static str),
}

/// Why an event name was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// No event name where the provider puts it.
    #[error("missing event name ({})", place(*.0))]
    Missing(EventSource),
    /// Empty, longer than 128 bytes, or with characters outside `[A-Za-z0-9_.:/-]`.
    #[error("malformed event name ({})", place(*.0))]
    Malformed(EventSource),
}

impl EventError {
    /// Where the name was looked for.
    pub fn source(self) -> EventSource {
        match self {
            EventError::Missing(s) | EventError::Malformed(s) => s,
        }
    }
}

fn place(source: EventSource) -> String {
    match source {
        EventSource::Header(h) => format!("{h} header"),
        EventSource::Body(f) => format!("body field {f}"),
    }
}

/// Whether `b` may appear in an event name.
fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-')
}

/// Checks an event name: 1 to 128 bytes of `[A-Za-z0-9_.:/-]`.
pub fn check(raw: Option<&[u8]>, from: EventSource) -> Result<&str, EventError> {
    let raw = raw.ok_or(EventError::Missing(from))?;
    if raw.is_empty() || raw.len() > MAX_EVENT_BYTES || !raw.iter().all(|&b| allowed(b)) {
        return Err(EventError::Malformed(from));
    }
    // Only ASCII passed: cannot fail.
    std::str::from_utf8(raw).map_err(|_| EventError::Malformed(from))
}

/// Checks an event name held as text (from a parsed body).
pub fn check_text<'a>(raw: Option<Cow<'a, str>>, from: EventSource) -> Result<Cow<'a, str>, EventError> {
    let text = raw.ok_or(EventError::Missing(from))?;
    check(Some(text.as_bytes()), from)?;
    Ok(text)
}

/// A delivery id when it is 1-256 bytes of printable ASCII; anything else counts as
/// no id (the event id then falls back to the body), never as a refusal.
pub fn delivery_id<'a>(raw: Option<Cow<'a, str>>) -> Option<Cow<'a, str>> {
    raw.filter(|id| {
        !id.is_empty() && id.len() <= MAX_DELIVERY_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
    })
}

/// A delivery id from a header's bytes.
pub fn delivery_id_bytes(raw: Option<&[u8]>) -> Option<Cow<'_, str>> {
    delivery_id(raw.and_then(|b| std::str::from_utf8(b).ok()).map(Cow::Borrowed))
}

/// The metric label for `name`: itself when `known` lists it, else `other`.
pub fn label(name: &str, known: &'static [&'static str]) -> &'static str {
    known.iter().copied().find(|k| *k == name).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: EventSource = EventSource::Header("X-Event");

    #[test]
    fn safe_names_pass_and_others_are_refused() {
        for good in
            [&b"push"[..], b"orders/create", b"members:pledge:create", b"pull_request.opened", b"A-Z_09"]
        {
            assert!(check(Some(good), H).is_ok(), "{good:?}");
        }
        assert_eq!(check(None, H), Err(EventError::Missing(H)));
        let long = [b'a'; MAX_EVENT_BYTES + 1];
        for bad in [&b""[..], b"a b", b"a*b", b"#", b"a\0", b"caf\xc3\xa9", b"a\"b", &long] {
            assert_eq!(check(Some(bad), H), Err(EventError::Malformed(H)), "{bad:?}");
        }
        assert!(check(Some(&long[..MAX_EVENT_BYTES]), H).is_ok());
    }

    #[test]
    fn delivery_ids_are_printable_and_bounded() {
        assert_eq!(delivery_id_bytes(Some(b"abc-123")).as_deref(), Some("abc-123"));
        assert_eq!(delivery_id_bytes(Some(b"")), None);
        assert_eq!(delivery_id_bytes(Some(b"a b")), None);
        assert_eq!(delivery_id_bytes(Some(&[b'x'; 257])), None);
        assert_eq!(delivery_id_bytes(None), None);
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(label("push", &["push", "ping"]), "push");
        assert_eq!(label("whatever", &["push"]), "other");
    }

    #[test]
    fn errors_say_where_the_name_was_looked_for() {
        assert_eq!(EventError::Missing(H).to_string(), "missing event name (X-Event header)");
        assert_eq!(
            EventError::Malformed(EventSource::Body("type")).to_string(),
            "malformed event name (body field type)"
        );
    }
}
