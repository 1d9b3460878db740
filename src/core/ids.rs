//! Validated identifiers of the domain: instance ids in the EC2 form and user ids.
//!
//! Everything that names an instance or a user arrives from outside the process (a command
//! payload, a request path, a tag), so both types can only be built through a check that says
//! what is wrong in words a caller can act on.

use std::fmt;

/// An instance id of the EC2 form: `i-` followed by 8 or 17 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct InstanceId(String);

/// Why a string is not an instance id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{shown}` is not an instance id: expected `i-` followed by 8 or 17 lowercase hex digits, like i-0123456789abcdef0")]
pub struct BadInstanceId {
    shown: String,
}

impl InstanceId {
    /// Checks `text` and returns it as an id.
    pub fn parse(text: &str) -> Result<Self, BadInstanceId> {
        if is_instance_id(text) {
            Ok(Self(text.to_owned()))
        } else {
            Err(BadInstanceId {
                shown: shorten(text),
            })
        }
    }

    /// Builds an id from 17 hex digits worth of randomness, as EC2 does.
    pub fn from_bits(bits: u128) -> Self {
        // 17 hex digits hold 68 bits; the mask keeps the rendering exactly 17 digits long.
        let masked = bits & ((1u128 << 68) - 1);
        Self(format!("i-{masked:017x}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// True when `text` has the shape of an EC2 instance id. Allocation-free: the proxy calls it
/// for every request.
pub fn is_instance_id(text: &str) -> bool {
    let Some(hex) = text.strip_prefix("i-") else {
        return false;
    };
    (hex.len() == 8 || hex.len() == 17)
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lets maps keyed by `InstanceId` be searched with the `&str` of a request path, without
/// allocating an id per request. Hash and equality are those of the inner string.
impl std::borrow::Borrow<str> for InstanceId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of a user as the calling application knows it. Stored in a tag, so it is bounded the
/// way EC2 tag values are.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

/// The longest user id accepted; EC2 tag values hold 256 characters.
pub const MAX_USER_ID_LEN: usize = 256;

/// Why a string is not a user id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadUserId {
    #[error("userId is empty: send the id of the user the workspace is for")]
    Empty,
    #[error("userId is {0} characters long: at most 256 are accepted")]
    TooLong(usize),
    #[error("userId contains a control character: send printable text only")]
    Control,
}

impl UserId {
    pub fn parse(text: &str) -> Result<Self, BadUserId> {
        let chars = text.chars().count();
        if text.trim().is_empty() {
            Err(BadUserId::Empty)
        } else if chars > MAX_USER_ID_LEN {
            Err(BadUserId::TooLong(chars))
        } else if text.chars().any(char::is_control) {
            Err(BadUserId::Control)
        } else {
            Ok(Self(text.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Cuts what we echo back in an error message, so a hostile 1 MB id is not mirrored whole.
fn shorten(text: &str) -> String {
    const SHOWN: usize = 40;
    if text.chars().count() <= SHOWN {
        text.escape_debug().to_string()
    } else {
        let head: String = text.chars().take(SHOWN).collect();
        format!("{}...", head.escape_debug())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_of_the_ec2_form_are_accepted() {
        for good in ["i-0123abcd", "i-0123456789abcdef0"] {
            assert_eq!(InstanceId::parse(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn instance_ids_of_other_forms_are_refused() {
        for bad in [
            "",
            "i-",
            "i-0123abc",
            "i-0123456789ABCDEF0",
            "i-0123456789abcdef01",
            "x-0123456789abcdef0",
            "i-0123456789abcdeg0",
            "i-../../etc",
        ] {
            assert!(InstanceId::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn generated_ids_are_valid_and_17_digits() {
        for bits in [0, 1, u128::MAX, 0xdead_beef] {
            let id = InstanceId::from_bits(bits);
            assert_eq!(id.as_str().len(), 19);
            assert!(is_instance_id(id.as_str()), "{id}");
        }
    }

    #[test]
    fn user_ids_are_checked() {
        assert_eq!(UserId::parse("1234-abcd").unwrap().as_str(), "1234-abcd");
        assert_eq!(UserId::parse("  "), Err(BadUserId::Empty));
        assert_eq!(UserId::parse("a\nb"), Err(BadUserId::Control));
        assert_eq!(
            UserId::parse(&"x".repeat(257)),
            Err(BadUserId::TooLong(257))
        );
    }

    #[test]
    fn long_bad_ids_are_shortened_in_messages() {
        let err = InstanceId::parse(&"z".repeat(10_000))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 200, "{err}");
    }
}
