//! vmha: the command-line interface.
fn main() {}
