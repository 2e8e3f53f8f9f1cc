//! Trigger (`X-Patreon-Event`) parsing and routing-key building on arbitrary bytes.
//!
//! Checks that an accepted trigger is 1-8 words of `[a-z0-9_]` joined by `:`, at most
//! 64 bytes, and that its dotted form is a safe AMQP routing-key suffix with the
//! same words and a bounded metric label.
#![no_main]

use hookrelay::verify::Trigger;
use hookrelay::verify::trigger::MAX_TRIGGER_BYTES;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(trigger) = Trigger::parse(Some(data)) else {
        return;
    };
    let name = trigger.as_str();
    assert_eq!(name.as_bytes(), data);
    assert!(!name.is_empty() && name.len() <= MAX_TRIGGER_BYTES);
    let words: Vec<&str> = name.split(':').collect();
    assert!((1..=8).contains(&words.len()));
    for w in &words {
        assert!(
            !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        );
    }
    let dotted = trigger.dotted();
    assert_eq!(dotted.split('.').collect::<Vec<_>>(), words);
    // A routing key must never carry topic wildcards or bytes a broker would reject.
    assert!(!dotted.contains(['*', '#', ' ']) && dotted.len() <= 255);
    match trigger.known() {
        Some(k) => assert_eq!(trigger.label(), k.as_str()),
        None => assert_eq!(trigger.label(), "other"),
    }
});
