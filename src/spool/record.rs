//! The record codec: a [`SpoolRecord`] as the payload bytes of one frame, and the
//! frame (`[len][crc][payload]`) the writer appends.

use bytes::{Buf, Bytes};

use super::SpoolError;
use super::segment::FRAME_HEADER_LEN;

/// Largest payload a record may have (and the sanity bound when reading).
pub const MAX_PAYLOAD_LEN: usize = 64 << 20;
const RECORD_VERSION: u8 = 1;

/// One spooled event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolRecord {
    /// Configured webhook source name.
    pub source: String,
    /// AMQP routing key to publish with.
    pub routing_key: String,
    /// CloudEvents id (for logs and dedup downstream).
    pub event_id: String,
    /// The encoded CloudEvents envelope (the AMQP message body).
    pub envelope: Bytes,
}

impl SpoolRecord {
    /// Length of [`Self::encode_payload`]'s output.
    pub fn payload_len(&self) -> usize {
        1 + 2
            + self.source.len()
            + 2
            + self.routing_key.len()
            + 2
            + self.event_id.len()
            + 4
            + self.envelope.len()
    }

    /// Encodes the record as a spool payload (format in the module docs).
    pub fn encode_payload(&self) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::with_capacity(self.payload_len());
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Decodes a spool payload.
    pub fn decode_payload(mut p: Bytes) -> Result<Self, SpoolError> {
        if p.remaining() < 1 {
            return Err(SpoolError::Corrupt("empty payload"));
        }
        if p.get_u8() != RECORD_VERSION {
            return Err(SpoolError::Corrupt("unknown record version"));
        }
        let source = take_str(&mut p)?;
        let routing_key = take_str(&mut p)?;
        let event_id = take_str(&mut p)?;
        if p.remaining() < 4 {
            return Err(SpoolError::Corrupt("short envelope length"));
        }
        let n = p.get_u32_le() as usize;
        if p.remaining() != n {
            return Err(SpoolError::Corrupt("envelope length mismatch"));
        }
        Ok(Self { source, routing_key, event_id, envelope: p })
    }

    fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), SpoolError> {
        let len = self.payload_len();
        if len > MAX_PAYLOAD_LEN {
            return Err(SpoolError::TooLarge { len, max: MAX_PAYLOAD_LEN });
        }
        out.reserve(len);
        out.push(RECORD_VERSION);
        put_str(out, "source", &self.source)?;
        put_str(out, "routing_key", &self.routing_key)?;
        put_str(out, "event_id", &self.event_id)?;
        // len <= MAX_PAYLOAD_LEN, so the envelope length fits in u32.
        out.extend_from_slice(&(self.envelope.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.envelope);
        Ok(())
    }

    /// The full on-disk frame: `[len][crc][payload]`.
    pub(super) fn encode_frame(&self) -> Result<Vec<u8>, SpoolError> {
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN as usize + self.payload_len());
        out.extend_from_slice(&[0u8; FRAME_HEADER_LEN as usize]);
        self.encode_into(&mut out)?;
        let payload = &out[FRAME_HEADER_LEN as usize..];
        let len = payload.len() as u32;
        let crc = crc32fast::hash(payload);
        out[0..4].copy_from_slice(&len.to_le_bytes());
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }
}

fn put_str(out: &mut Vec<u8>, field: &'static str, s: &str) -> Result<(), SpoolError> {
    let len = u16::try_from(s.len()).map_err(|_| SpoolError::FieldTooLong { field, len: s.len() })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn take_str(p: &mut Bytes) -> Result<String, SpoolError> {
    if p.remaining() < 2 {
        return Err(SpoolError::Corrupt("short string length"));
    }
    let n = p.get_u16_le() as usize;
    if p.remaining() < n {
        return Err(SpoolError::Corrupt("short string"));
    }
    let raw = p.split_to(n);
    String::from_utf8(raw.to_vec()).map_err(|_| SpoolError::Corrupt("string is not UTF-8"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::spool::testing::rec;

    #[test]
    fn record_codec_roundtrip_and_limits() {
        let r = rec(7);
        let payload = r.encode_payload().unwrap();
        assert_eq!(payload.len(), r.payload_len());
        assert_eq!(SpoolRecord::decode_payload(Bytes::from(payload.clone())).unwrap(), r);
        for cut in 0..payload.len() {
            assert!(SpoolRecord::decode_payload(Bytes::copy_from_slice(&payload[..cut])).is_err());
        }
        let mut long = rec(1);
        long.routing_key = "x".repeat(70_000);
        assert!(matches!(long.encode_payload(), Err(SpoolError::FieldTooLong { field: "routing_key", .. })));
        let mut bad_version = payload;
        bad_version[0] = 9;
        assert!(SpoolRecord::decode_payload(Bytes::from(bad_version)).is_err());
    }
}
