//! A deterministic simulated cluster.
