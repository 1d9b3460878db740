//! Signed tokens for users: a short-lived, single-use link (`REQUEST_RSTUDIO`'s `url`) and the
//! session cookie the proxy exchanges it for. Both are bound to one user and one instance and
//! signed with HMAC-SHA256; several secrets may verify (key rotation), the first one signs.
//! Pure: time and randomness come in. Single use is the proxy's memory of spent nonces.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// What a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A link, exchanged once for a session.
    Link,
    /// A session cookie.
    Session,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Link => "L",
            Kind::Session => "S",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub kind: Kind,
    pub instance: String,
    pub user: String,
    pub expires_ms: u64,
    pub nonce: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is for another workspace or purpose")]
    Mismatch,
}

/// Signs with the first secret, verifies with any.
#[derive(Clone)]
pub struct Signer {
    secrets: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} secrets)", self.secrets.len())
    }
}

impl Signer {
    /// `secrets` must not be empty.
    pub fn new(secrets: Vec<Vec<u8>>) -> Self {
        assert!(!secrets.is_empty(), "a signer needs at least one secret");
        Self { secrets }
    }

    fn mac(secret: &[u8], payload: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
        mac.update(payload);
        mac
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let payload = format!(
            "{}|{}|{}|{}|{:016x}",
            claims.kind.tag(),
            claims.instance,
            URL_SAFE_NO_PAD.encode(claims.user.as_bytes()),
            claims.expires_ms,
            claims.nonce
        );
        let tag = Self::mac(&self.secrets[0], payload.as_bytes())
            .finalize()
            .into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload.as_bytes()),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Checks the signature, the kind, the instance and the expiry.
    pub fn verify(
        &self,
        token: &str,
        kind: Kind,
        instance: &str,
        now_ms: u64,
    ) -> Result<Claims, TokenError> {
        if token.len() > 2048 {
            return Err(TokenError::Malformed);
        }
        let (payload_b64, tag_b64) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|_| TokenError::Malformed)?;
        if !self
            .secrets
            .iter()
            .any(|secret| Self::mac(secret, &payload).verify_slice(&tag).is_ok())
        {
            return Err(TokenError::BadSignature);
        }
        let text = std::str::from_utf8(&payload).map_err(|_| TokenError::Malformed)?;
        let fields: Vec<&str> = text.split('|').collect();
        let [tag, id, user, expires, nonce] = fields.as_slice() else {
            return Err(TokenError::Malformed);
        };
        let claims = Claims {
            kind: match *tag {
                "L" => Kind::Link,
                "S" => Kind::Session,
                _ => return Err(TokenError::Malformed),
            },
            instance: (*id).to_owned(),
            user: URL_SAFE_NO_PAD
                .decode(user)
                .ok()
                .and_then(|u| String::from_utf8(u).ok())
                .ok_or(TokenError::Malformed)?,
            expires_ms: expires.parse().map_err(|_| TokenError::Malformed)?,
            nonce: u64::from_str_radix(nonce, 16).map_err(|_| TokenError::Malformed)?,
        };
        if claims.kind != kind || claims.instance != instance {
            return Err(TokenError::Mismatch);
        }
        if now_ms >= claims.expires_ms {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "i-0123456789abcdef0";

    fn claims(kind: Kind, expires_ms: u64) -> Claims {
        Claims {
            kind,
            instance: ID.into(),
            user: "ana|b".into(),
            expires_ms,
            nonce: 42,
        }
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let s = Signer::new(vec![b"k1".to_vec()]);
        let t = s.sign(&claims(Kind::Link, 1000));
        assert_eq!(
            s.verify(&t, Kind::Link, ID, 999),
            Ok(claims(Kind::Link, 1000))
        );
        assert_eq!(s.verify(&t, Kind::Link, ID, 1000), Err(TokenError::Expired));
    }

    #[test]
    fn tokens_are_bound_to_kind_and_instance() {
        let s = Signer::new(vec![b"k1".to_vec()]);
        let t = s.sign(&claims(Kind::Link, 1000));
        assert_eq!(
            s.verify(&t, Kind::Session, ID, 0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            s.verify(&t, Kind::Link, "i-0123456789abcdef1", 0),
            Err(TokenError::Mismatch)
        );
    }

    #[test]
    fn rotation_accepts_old_secrets_and_refuses_unknown_ones() {
        let old = Signer::new(vec![b"old".to_vec()]);
        let rotated = Signer::new(vec![b"new".to_vec(), b"old".to_vec()]);
        let stranger = Signer::new(vec![b"other".to_vec()]);
        let t = old.sign(&claims(Kind::Session, 1000));
        assert!(rotated.verify(&t, Kind::Session, ID, 0).is_ok());
        assert_eq!(
            stranger.verify(&t, Kind::Session, ID, 0),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tampering_and_garbage_are_refused() {
        let s = Signer::new(vec![b"k1".to_vec()]);
        let t = s.sign(&claims(Kind::Link, 1000));
        let (payload, tag) = t.split_once('.').unwrap();
        let forged = URL_SAFE_NO_PAD.encode(
            String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap())
                .unwrap()
                .replace("|1000|", "|9999|"),
        );
        assert_eq!(
            s.verify(&format!("{forged}.{tag}"), Kind::Link, ID, 0),
            Err(TokenError::BadSignature)
        );
        for garbage in ["", ".", "abc", "a.b", &"x".repeat(5000)] {
            assert!(s.verify(garbage, Kind::Link, ID, 0).is_err(), "{garbage}");
        }
    }
}
