//! The VM monitor (SPEC §4.3, the patent's "VM monitoring agent").
