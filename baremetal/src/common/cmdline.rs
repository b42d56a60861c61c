//! Kernel command line (QEMU `-append`).

use core::sync::atomic::{AtomicU32, Ordering};

/// `hotplug-strict`: the hotplug test's senders also make *waiting* calls (call_single,
/// call_all) while CPUs go down and up, and a refused many-call that reached some CPUs
/// anyway fails the test — reproduces two engine problems (see the README).
pub const HOTPLUG_STRICT: u32 = 1 << 0;

static FLAGS: AtomicU32 = AtomicU32::new(0);

/// Parses the kernel command line (QEMU `-append`, as the architecture found it: x86_64 in the
/// PVH start info, aarch64 and riscv64 in the DTB's `/chosen/bootargs`).
pub fn parse(text: &str) {
    let mut flags = 0;
    for word in text.split_ascii_whitespace() {
        match word {
            "hotplug-strict" => flags |= HOTPLUG_STRICT,
            other => crate::println!("cmdline: ignoring unknown option {other:?}"),
        }
    }
    if !text.is_empty() {
        crate::println!("cmdline: {text:?}");
    }
    FLAGS.store(flags, Ordering::Relaxed);
}

/// Whether `flag` was given.
pub fn has(flag: u32) -> bool {
    FLAGS.load(Ordering::Relaxed) & flag != 0
}
