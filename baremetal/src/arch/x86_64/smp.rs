//! Starting the application processors: CPU count from QEMU's fw_cfg, the real-mode
//! trampoline copied to 0x8000, INIT-SIPI-SIPI to all-but-self, and each AP's bring-up.

use super::{apic, boot, cpu};
use crate::config::MAX_CPUS;
use crate::{percpu, println, time};

/// SIPI vector: the trampoline runs at `TRAMPOLINE_PAGE << 12`.
const TRAMPOLINE_PAGE: u8 = 0x08;

/// QEMU's CPU count (fw_cfg selector 0x05, FW_CFG_NB_CPUS, little-endian u16).
pub fn fw_cfg_cpu_count() -> usize {
    // SAFETY: fw_cfg's selector and data ports (0x510/0x511) on QEMU's PC machines.
    unsafe {
        cpu::outw(0x510, 0x0000); // signature
        let sig = [
            cpu::inb(0x511),
            cpu::inb(0x511),
            cpu::inb(0x511),
            cpu::inb(0x511),
        ];
        if &sig != b"QEMU" {
            return 1;
        }
        cpu::outw(0x510, 0x0005);
        let lo = cpu::inb(0x511) as usize;
        let hi = cpu::inb(0x511) as usize;
        (hi << 8 | lo).max(1)
    }
}

/// Starts every AP: copies the trampoline, INIT-SIPI-SIPI to all-but-self (the caller waits
/// for them to show up as started).
pub fn start_aps(expected: usize) {
    if expected <= 1 {
        return;
    }
    let (code, len) = boot::trampoline();
    let dest = (TRAMPOLINE_PAGE as usize) << 12;
    // SAFETY: 0x8000.. is free conventional memory below the kernel (identity-mapped), and the
    // trampoline is a few dozen bytes.
    unsafe { core::ptr::copy_nonoverlapping(code, dest as *mut u8, len) };
    apic::send_init_all_but_self();
    time::delay_us(10_000);
    apic::send_startup_all_but_self(TRAMPOLINE_PAGE);
    time::delay_us(200);
    apic::send_startup_all_but_self(TRAMPOLINE_PAGE);
    let want = expected.min(MAX_CPUS);
    time::wait_until(5_000, || boot::cpus_entered() as usize >= want);
    let entered = boot::cpus_entered();
    if (entered as usize) < want {
        println!("warning: only {entered} of {want} CPUs entered long mode");
    }
}

/// An AP's Rust entry (from the boot assembly, on its own stack, interrupts masked).
#[unsafe(no_mangle)]
extern "C" fn ap_main(cpu: u32) -> ! {
    let cpu = cpu as usize;
    // SAFETY: `cpu` came from the boot code's atomic counter: unique, < MAX_CPUS.
    unsafe { percpu::init_this_cpu(cpu) };
    super::enable_sse();
    apic::enable();
    crate::kernel::secondary_main(cpu)
}
