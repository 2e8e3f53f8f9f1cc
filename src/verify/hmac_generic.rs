//! Generic HMAC (`kind = "hmac"`): any sender that puts an HMAC of the raw body in a
//! header. The source configures the header (`signature_header`), the hash
//! (`algorithm`: md5, sha1, sha256, sha512), the encoding (`encoding`: hex in either
//! case, or base64), an optional prefix before the digest (`signature_prefix`, e.g.
//! `sha256=`), and optionally the headers naming the event (`event_header`, else every
//! event is `webhook`) and the delivery id (`id_header`).
//!
//! JSON bodies (by `Content-Type`, or none) are checked and embedded as `data`; any
//! other body is relayed as bytes.

use std::borrow::Cow;
use std::time::SystemTime;

use hmac::Hmac;
use md5::Md5;
use sha1::Sha1;
use sha2::{Sha256, Sha512};

use super::event::{self, EventSource};
use super::keys::{Keys, base64, mac};
use super::{
    Data, HeaderLines, HeaderMap, HeaderName, Kind, Outcome, Provider, ProviderSettings, SettingError, Shape,
    SignInput, SignatureError, Verified, data_for, header, json,
};

/// The `hmac` kind.
pub const KIND: Kind = Kind { name: "hmac", default_type_prefix: None, build, sign: sign_headers };

/// The event name when no `event_header` is configured.
pub const DEFAULT_EVENT: &str = "webhook";

const KNOWN_EVENTS: &[&str] = &[DEFAULT_EVENT];
const EVENT_SOURCE: EventSource = EventSource::Header("event_header");

/// The hash under the HMAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC-MD5 (16 bytes).
    Md5,
    /// HMAC-SHA1 (20 bytes).
    Sha1,
    /// HMAC-SHA256 (32 bytes), the default.
    Sha256,
    /// HMAC-SHA512 (64 bytes).
    Sha512,
}

impl Algorithm {
    /// Parses the `algorithm` option.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "md5" => Algorithm::Md5,
            "sha1" => Algorithm::Sha1,
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return None,
        })
    }

    fn digest_len(self) -> usize {
        match self {
            Algorithm::Md5 => 16,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
}

/// How the digest is written in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Hex digits, either case (the default).
    Hex,
    /// Standard base64 with padding.
    Base64,
}

impl Encoding {
    /// Parses the `encoding` option.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "hex" => Encoding::Hex,
            "base64" => Encoding::Base64,
            _ => return None,
        })
    }
}

/// Keyed states for whichever algorithm the source uses.
#[derive(Debug)]
enum AnyKeys {
    Md5(Keys<Hmac<Md5>>),
    Sha1(Keys<Hmac<Sha1>>),
    Sha256(Keys<Hmac<Sha256>>),
    Sha512(Keys<Hmac<Sha512>>),
}

impl AnyKeys {
    fn new(algorithm: Algorithm, secrets: &[&[u8]]) -> Self {
        let s = secrets.iter().copied();
        match algorithm {
            Algorithm::Md5 => AnyKeys::Md5(Keys::new(s)),
            Algorithm::Sha1 => AnyKeys::Sha1(Keys::new(s)),
            Algorithm::Sha256 => AnyKeys::Sha256(Keys::new(s)),
            Algorithm::Sha512 => AnyKeys::Sha512(Keys::new(s)),
        }
    }

    fn len(&self) -> usize {
        match self {
            AnyKeys::Md5(k) => k.len(),
            AnyKeys::Sha1(k) => k.len(),
            AnyKeys::Sha256(k) => k.len(),
            AnyKeys::Sha512(k) => k.len(),
        }
    }

    fn any_matches(&self, body: &[u8], digest: &[u8]) -> bool {
        match self {
            AnyKeys::Md5(k) => k.any_matches(&[body], &[digest]),
            AnyKeys::Sha1(k) => k.any_matches(&[body], &[digest]),
            AnyKeys::Sha256(k) => k.any_matches(&[body], &[digest]),
            AnyKeys::Sha512(k) => k.any_matches(&[body], &[digest]),
        }
    }
}

fn header_name(key: &'static str, value: &str) -> Result<HeaderName, SettingError> {
    HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| SettingError { key, problem: format!("`{value}` is not a header name") })
}

/// The signature header, algorithm and encoding the options name (with defaults).
fn parse_options(o: &super::KindOptions) -> Result<(&str, Algorithm, Encoding), SettingError> {
    let signature = o.signature_header.as_deref().ok_or_else(|| SettingError {
        key: "signature_header",
        problem: "kind \"hmac\" needs the header that carries the signature".into(),
    })?;
    let algorithm = match &o.algorithm {
        None => Algorithm::Sha256,
        Some(a) => Algorithm::parse(a).ok_or_else(|| SettingError {
            key: "algorithm",
            problem: "use md5, sha1, sha256 or sha512".into(),
        })?,
    };
    let encoding = match &o.encoding {
        None => Encoding::Hex,
        Some(e) => Encoding::parse(e)
            .ok_or_else(|| SettingError { key: "encoding", problem: "use hex or base64".into() })?,
    };
    Ok((signature, algorithm, encoding))
}

fn build(settings: &ProviderSettings<'_>) -> Result<Box<dyn Provider>, SettingError> {
    let o = settings.options;
    let (signature, algorithm, encoding) = parse_options(o)?;
    // Signature header first, then the event and id headers when configured.
    let mut single = vec![header_name("signature_header", signature)?];
    let event = o.event_header.as_deref().map(|h| header_name("event_header", h)).transpose()?;
    let id = o.id_header.as_deref().map(|h| header_name("id_header", h)).transpose()?;
    single.extend(event.iter().chain(id.iter()).cloned());
    let keys = AnyKeys::new(algorithm, &settings.secrets);
    let shape = Shape {
        event_header: event.clone().map(|h| (h, EVENT_SOURCE)),
        known_events: if event.is_some() { &[] } else { KNOWN_EVENTS },
        secret_count: keys.len(),
        single,
    };
    Ok(Box::new(Generic {
        keys,
        algorithm,
        encoding,
        prefix: o.signature_prefix.clone().unwrap_or_default().into_bytes(),
        event,
        id,
        signature: header_name("signature_header", signature)?,
        shape,
    }))
}

/// A generic HMAC source's verifier.
#[derive(Debug)]
struct Generic {
    keys: AnyKeys,
    algorithm: Algorithm,
    encoding: Encoding,
    prefix: Vec<u8>,
    event: Option<HeaderName>,
    id: Option<HeaderName>,
    signature: HeaderName,
    shape: Shape,
}

impl Generic {
    /// The digest in a header value: prefix (ASCII case ignored) and encoding checked,
    /// length that of the algorithm.
    fn decode(&self, value: &[u8]) -> Option<([u8; 64], usize)> {
        let value = value.trim_ascii();
        let (head, rest) = value.split_at_checked(self.prefix.len())?;
        if !head.eq_ignore_ascii_case(&self.prefix) {
            return None;
        }
        let len = self.algorithm.digest_len();
        let mut out = [0u8; 64];
        match self.encoding {
            Encoding::Hex => {
                if rest.len() != len * 2 {
                    return None;
                }
                hex::decode_to_slice(rest, &mut out[..len]).ok()?;
            }
            Encoding::Base64 => {
                use base64::Engine;
                if rest.len() > 128 {
                    return None;
                }
                let mut buf = [0u8; 96];
                let n = base64::engine::general_purpose::STANDARD.decode_slice(rest, &mut buf).ok()?;
                if n != len {
                    return None;
                }
                out[..len].copy_from_slice(&buf[..len]);
            }
        }
        Some((out, len))
    }
}

impl Provider for Generic {
    fn shape(&self) -> &Shape {
        &self.shape
    }

    fn verify<'a>(&self, headers: &'a HeaderMap, body: &'a [u8], _now: SystemTime) -> Outcome<'a> {
        let value = header(headers, &self.signature).ok_or(SignatureError::Missing)?;
        let (digest, len) = self.decode(value).ok_or(SignatureError::Malformed)?;
        if !self.keys.any_matches(body, &digest[..len]) {
            return Err(SignatureError::Mismatch.into());
        }
        let name = match &self.event {
            Some(h) => Cow::Borrowed(event::check(header(headers, h), EVENT_SOURCE)?),
            None => Cow::Borrowed(DEFAULT_EVENT),
        };
        let data = data_for(headers);
        if data == Data::Json {
            json::scan(body, &[])?;
        }
        let label = event::label(&name, self.shape.known_events);
        let id = self.id.as_ref().and_then(|h| event::delivery_id_bytes(header(headers, h)));
        Ok(Verified::new(body, name, label).with_delivery_id(id).with_data(data))
    }
}

/// The signature header value for `body` under these settings.
pub fn sign(secret: &[u8], algorithm: Algorithm, encoding: Encoding, prefix: &str, body: &[u8]) -> String {
    let digest = match algorithm {
        Algorithm::Md5 => mac::<Hmac<Md5>>(secret, &[body]),
        Algorithm::Sha1 => mac::<Hmac<Sha1>>(secret, &[body]),
        Algorithm::Sha256 => mac::<Hmac<Sha256>>(secret, &[body]),
        Algorithm::Sha512 => mac::<Hmac<Sha512>>(secret, &[body]),
    };
    let text = match encoding {
        Encoding::Hex => hex::encode(digest),
        Encoding::Base64 => base64(&digest),
    };
    format!("{prefix}{text}")
}

fn sign_headers(input: &SignInput<'_>) -> Result<HeaderLines, SettingError> {
    let o = input.options;
    let (signature, algorithm, encoding) = parse_options(o)?;
    let prefix = o.signature_prefix.as_deref().unwrap_or("");
    let mut out = Vec::with_capacity(3);
    if let Some(h) = &o.event_header {
        out.push((h.clone(), input.event.unwrap_or(DEFAULT_EVENT).to_owned()));
    }
    if let Some(h) = &o.id_header {
        out.push((h.clone(), input.id.to_owned()));
    }
    out.push((signature.to_owned(), sign(input.secret, algorithm, encoding, prefix, input.body)));
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::verify::EventError;
    use crate::verify::KindOptions;
    use crate::verify::VerifyError;
    use crate::verify::testing::{at, build_with, headers, vector, vector_body, vector_headers};

    fn options(pairs: &[(&str, &str)]) -> KindOptions {
        let mut o = KindOptions::default();
        for (k, v) in pairs {
            let v = Some(v.to_string());
            match *k {
                "signature_header" => o.signature_header = v,
                "algorithm" => o.algorithm = v,
                "encoding" => o.encoding = v,
                "signature_prefix" => o.signature_prefix = v,
                "event_header" => o.event_header = v,
                "id_header" => o.id_header = v,
                _ => panic!("{k}"),
            }
        }
        o
    }

    #[test]
    fn configured_like_github_it_takes_the_github_vectors() {
        let o = options(&[("signature_header", "X-Hub-Signature-256"), ("signature_prefix", "sha256=")]);
        let v = vector("github-computed-ping");
        let body = vector_body(&v);
        let p = build_with(&KIND, &["fixture-github-secret-NOT-REAL"], None, &o);
        let h = vector_headers(&v, &[]);
        let ok = p.verify(&h, &body, at(0)).unwrap();
        assert_eq!((ok.event(), ok.label(), ok.delivery_id()), ("webhook", "webhook", None));
        let o = options(&[
            ("signature_header", "X-Hub-Signature"),
            ("signature_prefix", "SHA1="),
            ("algorithm", "sha1"),
        ]);
        let p = build_with(&KIND, &["fixture-github-secret-NOT-REAL"], None, &o);
        assert!(p.verify(&vector_headers(&v, &[]), &body, at(0)).is_ok());
        let o = options(&[
            ("signature_header", "X-Shopify-Hmac-Sha256"),
            ("encoding", "base64"),
            ("event_header", "X-Shopify-Topic"),
            ("id_header", "X-Shopify-Webhook-Id"),
        ]);
        let v = vector("shopify-computed");
        let p = build_with(&KIND, &[v["secret"].as_str().unwrap()], None, &o);
        let h = vector_headers(&v, &[]);
        let body = vector_body(&v);
        let ok = p.verify(&h, &body, at(0)).unwrap();
        assert_eq!((ok.event(), ok.label()), ("orders/create", "other"));
        assert_eq!(ok.delivery_id(), Some("b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"));
    }

    #[test]
    fn every_algorithm_and_encoding() {
        let body = b"a=1&b=2";
        for alg in ["md5", "sha1", "sha256", "sha512"] {
            for enc in ["hex", "HEX", "base64"] {
                let o = options(&[
                    ("signature_header", "x-sig"),
                    ("algorithm", alg),
                    ("encoding", enc),
                    ("signature_prefix", "v="),
                ]);
                let p = build_with(&KIND, &["k"], None, &o);
                let sig =
                    sign(b"k", Algorithm::parse(alg).unwrap(), Encoding::parse(enc).unwrap(), "v=", body);
                let form = ("content-type", "application/x-www-form-urlencoded");
                let h = headers(&[("x-sig", &sig), form]);
                let ok = p.verify(&h, body, at(0)).unwrap();
                assert_eq!(ok.data(), Data::Binary { content_type: form.1 });
                if enc != "base64" {
                    let upper = format!("v={}", sig[2..].to_uppercase());
                    assert!(p.verify(&headers(&[("x-sig", &upper), form]), body, at(0)).is_ok());
                }
                let err = p.verify(&headers(&[("x-sig", &sig[2..]), form]), body, at(0)).unwrap_err();
                assert_eq!(err, VerifyError::Signature(SignatureError::Malformed), "{alg} {enc}");
                let other =
                    sign(b"x", Algorithm::parse(alg).unwrap(), Encoding::parse(enc).unwrap(), "v=", body);
                let err = p.verify(&headers(&[("x-sig", &other), form]), body, at(0)).unwrap_err();
                assert_eq!(err, VerifyError::Signature(SignatureError::Mismatch));
            }
        }
    }

    #[test]
    fn settings_are_checked() {
        let build = |pairs: &[(&str, &str)]| {
            let o = options(pairs);
            let s = ProviderSettings { secrets: vec![b"k"], tolerance: None, options: &o };
            (KIND.build)(&s).map(|_| ()).map_err(|e| e.key)
        };
        assert_eq!(build(&[]), Err("signature_header"));
        assert_eq!(build(&[("signature_header", "bad header")]), Err("signature_header"));
        assert_eq!(build(&[("signature_header", "x"), ("algorithm", "sha3")]), Err("algorithm"));
        assert_eq!(build(&[("signature_header", "x"), ("encoding", "base32")]), Err("encoding"));
        assert_eq!(build(&[("signature_header", "x"), ("event_header", "a b")]), Err("event_header"));
        assert_eq!(
            build(&[("signature_header", "x"), ("algorithm", "SHA512"), ("encoding", "Base64")]),
            Ok(())
        );
    }

    #[test]
    fn event_header_names_the_event() {
        let o = options(&[("signature_header", "x-sig"), ("event_header", "x-ev")]);
        let p = build_with(&KIND, &["k"], None, &o);
        let sig = sign(b"k", Algorithm::Sha256, Encoding::Hex, "", b"{}");
        let h = headers(&[("x-sig", &sig), ("x-ev", "thing.done")]);
        let ok = p.verify(&h, b"{}", at(0)).unwrap();
        assert_eq!((ok.event(), ok.label()), ("thing.done", "other"));
        let err = p.verify(&headers(&[("x-sig", &sig)]), b"{}", at(0)).unwrap_err();
        assert_eq!(err, VerifyError::Event(EventError::Missing(EVENT_SOURCE)));
        let sig = sign(b"k", Algorithm::Sha256, Encoding::Hex, "", b"nope");
        let err = p.verify(&headers(&[("x-sig", &sig), ("x-ev", "a")]), b"nope", at(0)).unwrap_err();
        assert_eq!(err, VerifyError::Json(json::JsonError::Invalid));
    }
}
