//! The app monitor (SPEC §4.1, the patent's "application monitoring agent").
