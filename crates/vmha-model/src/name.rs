//! Names of hosts, VMs, apps and API tokens.

use std::fmt;

/// A validated object name: 1–63 characters from `[A-Za-z0-9._-]`, starting with a letter or
/// digit. Names appear in file paths, URLs and the CLI's `VM/APP` syntax, so nothing else is
/// allowed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Name(String);

/// Why a string is not a valid [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("a name cannot be empty")]
    Empty,
    /// The name is longer than 63 characters.
    #[error("a name has at most 63 characters (this one has {0})")]
    TooLong(usize),
    /// The name contains a character outside `[A-Za-z0-9._-]` or starts with `.`, `_`, `-`.
    #[error(
        "`{0}` is not a valid name: use letters, digits, `.`, `_` and `-`, starting with a letter or digit"
    )]
    BadCharacter(String),
}

impl Name {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > 63 {
            return Err(NameError::TooLong(s.len()));
        }
        let first_ok = s.as_bytes()[0].is_ascii_alphanumeric();
        let rest_ok = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !first_ok || !rest_ok {
            return Err(NameError::BadCharacter(s.to_string()));
        }
        Ok(Name(s.to_string()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::new(s)
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        assert!(Name::new("db01").is_ok());
        assert!(Name::new("kvm-1.lab_a").is_ok());
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert!(matches!(Name::new("a/b"), Err(NameError::BadCharacter(_))));
        assert!(matches!(Name::new("-x"), Err(NameError::BadCharacter(_))));
        assert!(matches!(
            Name::new(&"a".repeat(64)),
            Err(NameError::TooLong(64))
        ));
    }
}
