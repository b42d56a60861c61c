//! The PVH start-info block's command line.

const PVH_MAGIC: u32 = 0x336e_c578;

/// Reads the command line from `hvm_start_info` (magic at 0, cmdline_paddr at 24).
pub fn parse_pvh(start_info: u32) {
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
    crate::cmdline::parse(core::str::from_utf8(&bytes[..len]).unwrap_or(""));
}
