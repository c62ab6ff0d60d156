//! Grant ids.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A grant id: 64 random bits, never zero. Shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantId(pub u64);

impl fmt::Display for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("grant id {0:?} is not 1 to 16 hex digits")]
pub struct BadGrantId(String);

impl FromStr for GrantId {
    type Err = BadGrantId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match u64::from_str_radix(s, 16) {
            Ok(v) if v != 0 && !s.starts_with('+') && s.len() <= 16 => Ok(GrantId(v)),
            _ => Err(BadGrantId(s.to_owned())),
        }
    }
}

impl Serialize for GrantId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GrantId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
