//! Kernel command line (QEMU `-append`), from the PVH start-info block.

use core::sync::atomic::{AtomicU32, Ordering};

/// `hotplug-strict`: the hotplug test's senders also make *waiting* calls (call_single,
/// call_all) while CPUs go down and up, and a refused many-call that reached some CPUs
/// anyway fails the test — reproduces two engine problems (see the README).
pub const HOTPLUG_STRICT: u32 = 1 << 0;

static FLAGS: AtomicU32 = AtomicU32::new(0);

const PVH_MAGIC: u32 = 0x336e_c578;

/// Reads the command line from `hvm_start_info` (magic at 0, cmdline_paddr at 24).
pub fn parse(start_info: u32) {
    if start_info == 0 {
        return;
    }
    let p = start_info as usize as *const u8;
    // SAFETY: the loader's start-info block, identity-mapped; read-only.
    let (magic, cmdline) = unsafe {
        (
            (p as *const u32).read_volatile(),
            (p.add(24) as *const u64).read_unaligned(),
        )
    };
    if magic != PVH_MAGIC || cmdline == 0 || cmdline >= 1 << 32 {
        return;
    }
    let mut bytes = [0u8; 256];
    let mut len = 0;
    while len < bytes.len() {
        // SAFETY: a NUL-terminated string in low memory (bounded by the buffer size).
        let b = unsafe { (cmdline as usize as *const u8).add(len).read_volatile() };
        if b == 0 {
            break;
        }
        bytes[len] = b;
        len += 1;
    }
    let text = core::str::from_utf8(&bytes[..len]).unwrap_or("");
    let mut flags = 0;
    for word in text.split_ascii_whitespace() {
        match word {
            "hotplug-strict" => flags |= HOTPLUG_STRICT,
            other => crate::println!("cmdline: ignoring unknown option {other:?}"),
        }
    }
    if len > 0 {
        crate::println!("cmdline: {text:?}");
    }
    FLAGS.store(flags, Ordering::Relaxed);
}

/// Whether `flag` was given.
pub fn has(flag: u32) -> bool {
    FLAGS.load(Ordering::Relaxed) & flag != 0
}
