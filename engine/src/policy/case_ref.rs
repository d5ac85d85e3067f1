//! Case references: `FU-` + 12 upper-case hex digits, what a user quotes to support.
//!
//! The policy is pure, so it never draws randomness itself: the caller passes 48 random bits
//! (`CaseRef::from_bits(rng.random())`) and the policy only formats and validates.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A validated case reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CaseRef(String);

/// A string that is not `FU-` + 12 upper-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid case reference {0:?}: expected FU- followed by 12 upper-case hex digits")]
pub struct InvalidCaseRef(pub String);

impl InvalidCaseRef {
    pub const CODE: &'static str = "invalid_case_ref";
}

impl CaseRef {
    /// The low 48 bits of `bits`, as 12 upper-case hex digits after `FU-`.
    pub fn from_bits(bits: u64) -> CaseRef {
        CaseRef(format!("FU-{:012X}", bits & 0xFFFF_FFFF_FFFF))
    }

    pub fn parse(s: &str) -> Result<CaseRef, InvalidCaseRef> {
        let valid = s.len() == 15
            && s.starts_with("FU-")
            && s[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
        if valid {
            Ok(CaseRef(s.to_owned()))
        } else {
            Err(InvalidCaseRef(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CaseRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for CaseRef {
    type Error = InvalidCaseRef;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        CaseRef::parse(&s)
    }
}

impl From<CaseRef> for String {
    fn from(c: CaseRef) -> String {
        c.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_bits_formats_twelve_upper_hex_digits() {
        assert_eq!(CaseRef::from_bits(0xab).as_str(), "FU-0000000000AB");
        assert_eq!(CaseRef::from_bits(u64::MAX).as_str(), "FU-FFFFFFFFFFFF");
        assert!(CaseRef::parse(CaseRef::from_bits(0x1234_5678_9abc).as_str()).is_ok());
    }

    #[test]
    fn parse_rejects_lower_case_wrong_prefix_and_wrong_length() {
        for bad in [
            "FU-0000000000ab",
            "XX-000000000000",
            "FU-00000000000",
            "FU-0000000000000",
            "FU-00000000000G",
        ] {
            assert_eq!(CaseRef::parse(bad), Err(InvalidCaseRef(bad.to_owned())));
        }
    }
}
