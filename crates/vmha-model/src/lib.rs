//! vmha-model
