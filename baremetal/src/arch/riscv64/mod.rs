//! riscv64: see the README (port in progress).
