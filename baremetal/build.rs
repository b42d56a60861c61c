//! Passes the architecture's linker script (`src/arch/<arch>/linker.ld`).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
    println!("cargo:rustc-link-arg-bins=-T{dir}/src/arch/{arch}/linker.ld");
    println!("cargo:rerun-if-changed=src/arch/{arch}/linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
