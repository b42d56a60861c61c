//! Just enough of a flattened device tree to read `/chosen/bootargs` (QEMU's `-append`) on the
//! architectures whose firmware hands over a DTB (aarch64: at the start of RAM for a non-Linux
//! `-kernel`; riscv64: OpenSBI passes its address in a1).

const FDT_MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;

/// Reads the big-endian word at `addr`.
///
/// # Safety
/// `addr..addr + 4` must be readable memory.
unsafe fn be32(addr: usize) -> u32 {
    // SAFETY: forwarded; the DTB is 4-byte aligned, read with volatile (firmware-written).
    u32::from_be(unsafe { core::ptr::read_volatile(addr as *const u32) })
}

/// The NUL-terminated string at `addr` (at most `max` bytes).
///
/// # Safety
/// The bytes up to the NUL (or `max`) must be readable and stay unchanged forever.
unsafe fn cstr(addr: usize, max: usize) -> &'static [u8] {
    let mut n = 0;
    // SAFETY: forwarded.
    while n < max && unsafe { *((addr + n) as *const u8) } != 0 {
        n += 1;
    }
    // SAFETY: forwarded: `n` readable bytes that never change.
    unsafe { core::slice::from_raw_parts(addr as *const u8, n) }
}

/// `/chosen/bootargs` of the DTB at `dtb`, if there is a DTB there and it has one.
///
/// # Safety
/// `dtb` must be readable memory (at least a header's worth); if it holds the DTB magic, the
/// whole blob must be readable and never change (firmware hands it over for good).
pub unsafe fn bootargs(dtb: usize) -> Option<&'static str> {
    if dtb == 0 || !dtb.is_multiple_of(4) {
        return None;
    }
    // SAFETY: the header words (the caller's contract).
    let (magic, total, off_struct, off_strings) =
        unsafe { (be32(dtb), be32(dtb + 4), be32(dtb + 8), be32(dtb + 12)) };
    if magic != FDT_MAGIC || total > 16 << 20 {
        return None;
    }
    let end = dtb + total as usize;
    let strings = dtb + off_strings as usize;
    let mut p = dtb + off_struct as usize;
    let mut depth = 0usize;
    let mut in_chosen = false;
    while p + 4 <= end {
        // SAFETY: inside the blob (checked against `end`).
        let token = unsafe { be32(p) };
        p += 4;
        match token {
            BEGIN_NODE => {
                // SAFETY: the node name, inside the blob.
                let name = unsafe { cstr(p, end - p) };
                p = (p + name.len() + 1 + 3) & !3;
                depth += 1;
                in_chosen = depth == 2 && (name == b"chosen" || name.starts_with(b"chosen@"));
            }
            END_NODE => {
                depth = depth.saturating_sub(1);
                in_chosen = false;
            }
            PROP => {
                if p + 8 > end {
                    return None;
                }
                // SAFETY: the property header, inside the blob.
                let (len, name_off) = unsafe { (be32(p) as usize, be32(p + 4) as usize) };
                let value = p + 8;
                p = (value + len + 3) & !3;
                if in_chosen && value + len <= end {
                    // SAFETY: the property name in the strings block, inside the blob.
                    let name = unsafe { cstr(strings + name_off, end.saturating_sub(strings)) };
                    if name == b"bootargs" {
                        // SAFETY: the value, inside the blob.
                        let v = unsafe { cstr(value, len) };
                        return core::str::from_utf8(v).ok();
                    }
                }
            }
            NOP => {}
            _ => return None, // FDT_END or garbage
        }
    }
    None
}
