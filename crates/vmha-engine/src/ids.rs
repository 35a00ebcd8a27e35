//! Identifiers of actions the engine asks its driver to perform.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies one action of a [`crate::HostAgent`] or [`crate::Controller`]. Unique per engine
/// instance (a counter); the driver echoes it back in the action's result.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ActionId(pub u64);

impl fmt::Display for ActionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}
