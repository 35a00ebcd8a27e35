//! vmha-engine
