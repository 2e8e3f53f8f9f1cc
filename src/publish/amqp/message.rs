//! Message mapping: how an envelope becomes an AMQP message (properties and the
//! CloudEvents AMQP binding's headers), and how a dead-lettered copy says why. Pure.

use lapin::BasicProperties;
use lapin::message::BasicReturnMessage;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::envelope::{CONTENT_TYPE, Envelope, SPEC_VERSION};

/// `app_id` written on every message.
pub const APP_ID: &str = "hookrelay";
/// Header naming why the relay dead-lettered a message.
pub const REASON_HEADER: &str = "x-hookrelay-reason";
/// Header counting the publish attempts before dead-lettering.
pub const ATTEMPTS_HEADER: &str = "x-hookrelay-attempts";
/// Header keeping the original routing key of a dead-lettered message.
pub const ROUTING_KEY_HEADER: &str = "x-hookrelay-routing-key";

/// One message to publish: where it goes and what it carries.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// Exchange to publish to.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body bytes.
    pub body: &'a [u8],
    /// `message_id`, used to match a returned message to its publish.
    pub message_id: &'a str,
}

impl<'a> Message<'a> {
    /// The envelope as published to `exchange` under its own routing key.
    pub fn of(exchange: &'a str, env: &'a Envelope) -> Self {
        Message { exchange, routing_key: &env.routing_key, body: &env.body, message_id: &env.id }
    }
}

/// Message properties without headers: persistent, typed, identified.
fn base_properties(env: &Envelope) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(env.id.as_str().into())
        .with_timestamp(env.unix_seconds)
        .with_type(env.ce_type.as_str().into())
        .with_app_id(APP_ID.into())
}

/// The CloudEvents AMQP binding's application properties, so consumers can filter
/// without parsing the body.
fn envelope_headers(env: &Envelope) -> FieldTable {
    let mut h = FieldTable::default();
    let mut put = |k: &str, v: &str| {
        h.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    };
    put("cloudEvents_specversion", SPEC_VERSION);
    put("cloudEvents_id", &env.id);
    put("cloudEvents_source", &env.source);
    put("cloudEvents_type", &env.ce_type);
    put("cloudEvents_time", &env.time);
    if let Some(subject) = &env.subject {
        put("cloudEvents_subject", subject);
    }
    if let Some(delivery_id) = &env.delivery_id {
        put("cloudEvents_deliveryid", delivery_id);
    }
    h
}

/// Full message properties for an envelope.
pub fn properties(env: &Envelope) -> BasicProperties {
    base_properties(env).with_headers(envelope_headers(env))
}

/// Properties of the copy sent to the dead-letter exchange: the envelope's own plus
/// why, after how many attempts, and the routing key it was meant for.
pub fn dead_letter_properties(env: &Envelope, reason: &str, attempts: u32) -> BasicProperties {
    let mut headers = envelope_headers(env);
    headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(attempts.min(i32::MAX as u32) as i32));
    headers.insert(ROUTING_KEY_HEADER.into(), AMQPValue::LongString(env.routing_key.as_str().into()));
    base_properties(env).with_headers(headers)
}

/// Whether a message the broker returned is the one published as `message_id`.
/// The client can attach a return to the wrong confirm when several are in flight.
pub fn is_return_of(returned: &BasicReturnMessage, message_id: &str) -> bool {
    returned_id(returned) == Some(message_id)
}

/// The `message_id` of a returned message, if it has one.
pub fn returned_id(returned: &BasicReturnMessage) -> Option<&str> {
    returned.delivery.properties.message_id().as_ref().map(ShortString::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(subject: Option<&str>) -> Envelope {
        Envelope {
            id: "0190b7c4-0000-8000-8000-000000000001".into(),
            source: "https://www.patreon.com".into(),
            ce_type: "com.patreon.members.create".into(),
            time: "2024-07-01T12:00:00Z".into(),
            unix_seconds: 1_719_835_200,
            subject: subject.map(str::to_owned),
            delivery_id: None,
            routing_key: "patreon.members.create".into(),
            body: bytes::Bytes::from_static(b"{}"),
        }
    }

    fn header<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
        props.headers().as_ref()?.inner().get(key)
    }

    fn text(value: Option<&AMQPValue>) -> Option<String> {
        match value? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        }
    }

    #[test]
    fn properties_are_persistent_and_carry_the_cloudevents_binding() {
        let env = envelope(Some("members/42"));
        let props = properties(&env);
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        assert_eq!(props.content_type().as_ref().map(ShortString::as_str), Some(CONTENT_TYPE));
        assert_eq!(props.message_id().as_ref().map(ShortString::as_str), Some(env.id.as_str()));
        assert_eq!(*props.timestamp(), Some(env.unix_seconds));
        assert_eq!(props.kind().as_ref().map(ShortString::as_str), Some("com.patreon.members.create"));
        assert_eq!(props.app_id().as_ref().map(ShortString::as_str), Some(APP_ID));
        assert_eq!(text(header(&props, "cloudEvents_specversion")).as_deref(), Some(SPEC_VERSION));
        assert_eq!(text(header(&props, "cloudEvents_id")), Some(env.id.clone()));
        assert_eq!(text(header(&props, "cloudEvents_source")), Some(env.source.clone()));
        assert_eq!(text(header(&props, "cloudEvents_type")), Some(env.ce_type.clone()));
        assert_eq!(text(header(&props, "cloudEvents_time")), Some(env.time.clone()));
        assert_eq!(text(header(&props, "cloudEvents_subject")).as_deref(), Some("members/42"));
    }

    #[test]
    fn no_subject_means_no_subject_header() {
        let props = properties(&envelope(None));
        assert_eq!(header(&props, "cloudEvents_subject"), None);
        assert_eq!(props.headers().as_ref().map(|h| h.inner().len()), Some(5));
        assert_eq!(header(&props, "cloudEvents_deliveryid"), None);
    }

    #[test]
    fn a_provider_delivery_id_is_carried_verbatim() {
        let env = Envelope { delivery_id: Some("evt_1Abc".into()), ..envelope(None) };
        let props = properties(&env);
        assert_eq!(text(header(&props, "cloudEvents_deliveryid")).as_deref(), Some("evt_1Abc"));
    }

    #[test]
    fn a_dead_lettered_copy_says_why_how_often_and_where_it_was_going() {
        let env = envelope(None);
        let props = dead_letter_properties(&env, "nacked", 3);
        assert_eq!(text(header(&props, REASON_HEADER)).as_deref(), Some("nacked"));
        assert_eq!(header(&props, ATTEMPTS_HEADER), Some(&AMQPValue::LongInt(3)));
        assert_eq!(text(header(&props, ROUTING_KEY_HEADER)), Some(env.routing_key.clone()));
        assert_eq!(text(header(&props, "cloudEvents_id")), Some(env.id.clone()), "keeps the binding");
        assert_eq!(*props.delivery_mode(), Some(2));
        let huge = dead_letter_properties(&env, "nacked", u32::MAX);
        assert_eq!(header(&huge, ATTEMPTS_HEADER), Some(&AMQPValue::LongInt(i32::MAX)), "saturates");
    }

    #[test]
    fn a_message_of_an_envelope_keeps_its_key_body_and_id() {
        let env = envelope(None);
        let msg = Message::of("hookrelay", &env);
        assert_eq!(msg.exchange, "hookrelay");
        assert_eq!(msg.routing_key, env.routing_key);
        assert_eq!(msg.body, &env.body[..]);
        assert_eq!(msg.message_id, env.id);
    }
}
