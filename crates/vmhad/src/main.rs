//! vmhad: the host daemon.
fn main() {}
