//! Model-checked tests of the lock-free parts (run with `RUSTFLAGS="--cfg loom"`).
