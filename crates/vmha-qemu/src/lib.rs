//! vmha-qemu
