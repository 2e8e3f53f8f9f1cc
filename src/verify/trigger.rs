//! Event trigger names (`members:pledge:create`): parsing, the known set, and the
//! derived CloudEvents type and routing-key suffix.

/// Longest trigger accepted, in bytes. Patreon's longest is 21.
pub const MAX_TRIGGER_BYTES: usize = 64;

/// Triggers Patreon documents. Anything else that is well formed is still relayed,
/// but counted as `other` so metric labels stay a bounded set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownTrigger {
    PledgesCreate,
    PledgesUpdate,
    PledgesDelete,
    MembersCreate,
    MembersUpdate,
    MembersDelete,
    MembersPledgeCreate,
    MembersPledgeUpdate,
    MembersPledgeDelete,
    PostsPublish,
    PostsUpdate,
    PostsDelete,
}

impl KnownTrigger {
    /// Every known trigger, for pre-registering metric series.
    pub const ALL: [KnownTrigger; 12] = [
        KnownTrigger::PledgesCreate,
        KnownTrigger::PledgesUpdate,
        KnownTrigger::PledgesDelete,
        KnownTrigger::MembersCreate,
        KnownTrigger::MembersUpdate,
        KnownTrigger::MembersDelete,
        KnownTrigger::MembersPledgeCreate,
        KnownTrigger::MembersPledgeUpdate,
        KnownTrigger::MembersPledgeDelete,
        KnownTrigger::PostsPublish,
        KnownTrigger::PostsUpdate,
        KnownTrigger::PostsDelete,
    ];

    /// The trigger as Patreon writes it.
    pub const fn as_str(self) -> &'static str {
        match self {
            KnownTrigger::PledgesCreate => "pledges:create",
            KnownTrigger::PledgesUpdate => "pledges:update",
            KnownTrigger::PledgesDelete => "pledges:delete",
            KnownTrigger::MembersCreate => "members:create",
            KnownTrigger::MembersUpdate => "members:update",
            KnownTrigger::MembersDelete => "members:delete",
            KnownTrigger::MembersPledgeCreate => "members:pledge:create",
            KnownTrigger::MembersPledgeUpdate => "members:pledge:update",
            KnownTrigger::MembersPledgeDelete => "members:pledge:delete",
            KnownTrigger::PostsPublish => "posts:publish",
            KnownTrigger::PostsUpdate => "posts:update",
            KnownTrigger::PostsDelete => "posts:delete",
        }
    }

    const fn name_at(i: usize) -> &'static str {
        Self::ALL[i].as_str()
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// The known triggers' names (the `event` metric labels of a Patreon source).
pub const NAMES: [&str; 12] = {
    let mut out = [""; 12];
    let mut i = 0;
    while i < out.len() {
        out[i] = KnownTrigger::name_at(i);
        i += 1;
    }
    out
};

/// Why an event header was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    /// The header is absent.
    #[error("missing event header")]
    Missing,
    /// The header is not lower-case words joined by `:`.
    #[error("malformed event header")]
    Malformed,
}

/// A well-formed trigger: 1 to 8 words of `[a-z0-9_]`, joined by `:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    name: String,
    known: Option<KnownTrigger>,
}

impl Trigger {
    /// Parses a header value; `None` means the header was absent.
    pub fn parse(header: Option<&[u8]>) -> Result<Trigger, TriggerError> {
        let raw = header.ok_or(TriggerError::Missing)?;
        if raw.is_empty() || raw.len() > MAX_TRIGGER_BYTES {
            return Err(TriggerError::Malformed);
        }
        let mut words = 0;
        for word in raw.split(|&b| b == b':') {
            words += 1;
            let ok = !word.is_empty()
                && word.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok || words > 8 {
                return Err(TriggerError::Malformed);
            }
        }
        // Only ASCII passed the loop above, so this cannot fail; map it anyway.
        let name = std::str::from_utf8(raw).map_err(|_| TriggerError::Malformed)?;
        Ok(Trigger { known: KnownTrigger::from_name(name), name: name.to_owned() })
    }

    /// The trigger as sent, e.g. `members:pledge:create`.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The trigger as sent, owned.
    pub fn into_name(self) -> String {
        self.name
    }

    /// The documented trigger, if it is one.
    pub fn known(&self) -> Option<KnownTrigger> {
        self.known
    }

    /// The bounded metric label: the trigger when known, otherwise `other`.
    pub fn label(&self) -> &'static str {
        self.known.map_or("other", KnownTrigger::as_str)
    }

    /// The trigger with `:` turned into `.`, e.g. `members.pledge.create`.
    pub fn dotted(&self) -> String {
        self.name.replace(':', ".")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_triggers_parse() {
        let t = Trigger::parse(Some(b"members:pledge:create")).unwrap();
        assert_eq!(t.known(), Some(KnownTrigger::MembersPledgeCreate));
        assert_eq!(t.dotted(), "members.pledge.create");
        assert_eq!(t.label(), "members:pledge:create");
        let t = Trigger::parse(Some(b"members:pledge:paused")).unwrap();
        assert_eq!(t.known(), None);
        assert_eq!(t.label(), "other");
    }

    #[test]
    fn malformed_triggers_are_refused() {
        assert_eq!(Trigger::parse(None), Err(TriggerError::Missing));
        for bad in [
            &b""[..],
            b"Members:create",
            b"members::create",
            b":members",
            b"members:",
            b"members create",
            b"members.create",
            b"a:b:c:d:e:f:g:h:i",
            b"caf\xc3\xa9",
            b"members\0create",
            &[b'a'; 65],
        ] {
            assert_eq!(Trigger::parse(Some(bad)), Err(TriggerError::Malformed), "{bad:?}");
        }
    }
}
