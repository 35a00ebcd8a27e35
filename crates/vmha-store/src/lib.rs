//! vmha-store
