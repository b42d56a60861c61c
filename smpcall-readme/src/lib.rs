//! The workspace README's Rust examples, compiled and run as doctests by
//! `cargo test --workspace`. They live here, not in `smpcall`, because the workspace README is
//! not part of the `smpcall` package (whose own README is tested by `smpcall`'s doctests).
#![no_std]

/// The workspace README, whose `rust` blocks are doctests.
#[cfg(all(doctest, target_os = "linux"))]
#[doc = include_str!("../../README.md")]
pub struct WorkspaceReadme;
