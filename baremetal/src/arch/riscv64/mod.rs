//! riscv64 on QEMU `virt` with OpenSBI: S-mode kernel, IPIs through the SBI IPI extension
//! (a supervisor software interrupt, multiplexed by a per-hart pending word), masking with
//! `sstatus.SIE`, harts started with SBI HSM, the `time` CSR as the clock, the 16550 UART,
//! exit through QEMU's `sifive_test` device.
//!
//! Exports the interface described in `arch/x86_64/mod.rs`.
//!
//! **No NMI.** S-mode has no non-maskable interrupt (RNMI is an M-mode extension QEMU 7.2's
//! `virt` does not offer, and OpenSBI does not forward one), so `HAS_NMI` is false: the engine's
//! `nmi_call_many` is refused (`Unsupported("NMIs")`), stall reports do not trigger an NMI
//! report from the stuck CPU, and `cpu_irqs_masked` of another CPU is unknown — a stall report
//! says what the engine itself knows (requested/responded counts, in-handler, polling, queue)
//! and re-sends the IPI. A CPU stuck with SIE clear can only be diagnosed from outside.

pub mod boot;

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::config::{Ipi, MAX_CPUS};

/// Architecture name.
pub const NAME: &str = "riscv64";

/// QEMU `virt`'s timebase (the `time` CSR's frequency; DTB `timebase-frequency`).
const TIMEBASE_HZ: u64 = 10_000_000;

/// Makes `cpu` this hart's index (`tp` = index + 1).
///
/// # Safety
/// Once per CPU, on that CPU, with a `cpu` no other CPU uses.
pub unsafe fn set_cpu_index(cpu: usize) {
    // SAFETY: `tp` is reserved by the compiler (thread pointer) and unused in this kernel
    // (no TLS); it becomes the per-CPU register.
    unsafe { asm!("mv tp, {}", in(reg) cpu + 1, options(nomem, nostack, preserves_flags)) };
}

/// `tp` (index + 1; 0 before `set_cpu_index`, zeroed by the entry code).
#[inline]
pub fn cpu_index_plus_one() -> usize {
    let v: usize;
    // SAFETY: reads `tp`.
    unsafe { asm!("mv {}, tp", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// This hart's id (set at entry; `hw_id` reads it from the per-CPU table).
static HART_OF_CPU: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_CPUS];

/// The hart id.
pub fn hw_id() -> u32 {
    let cpu = cpu_index_plus_one().wrapping_sub(1);
    HART_OF_CPU
        .get(cpu)
        .map_or(u32::MAX, |h| h.load(Ordering::Relaxed))
}

const SSTATUS_SIE: usize = 1 << 1;

/// Clears `sstatus.SIE`; returns whether it was set.
#[inline]
pub fn irq_save() -> bool {
    let old: usize;
    // SAFETY: masking is always allowed. Not `nomem`: orders the masked region's accesses.
    unsafe { asm!("csrrci {}, sstatus, 2", out(reg) old, options(nostack, preserves_flags)) };
    old & SSTATUS_SIE != 0
}

/// Sets `sstatus.SIE` again if it was set.
#[inline]
pub fn irq_restore(was_enabled: bool) {
    if was_enabled {
        // SAFETY: re-enabling interrupts the caller had enabled; `stvec` is set.
        unsafe { asm!("csrsi sstatus, 2", options(nostack, preserves_flags)) };
    } else {
        disable_irqs();
    }
}

/// `sstatus.SIE`.
pub fn irqs_enabled() -> bool {
    let s: usize;
    // SAFETY: reads sstatus.
    unsafe { asm!("csrr {}, sstatus", out(reg) s, options(nomem, nostack, preserves_flags)) };
    s & SSTATUS_SIE != 0
}

/// `sie.SSIE` and `sstatus.SIE` on.
///
/// # Safety
/// `stvec` must be set on this hart.
pub unsafe fn enable_irqs() {
    // SAFETY: forwarded; only the software interrupt is enabled in `sie`.
    unsafe { asm!("csrs sie, {}", "csrsi sstatus, 2", in(reg) 1usize << 1, options(nostack)) };
}

/// Clears `sstatus.SIE`.
pub fn disable_irqs() {
    // SAFETY: masking is always allowed.
    unsafe { asm!("csrci sstatus, 2", options(nostack, preserves_flags)) };
}

/// `wfi` with SIE clear (it wakes for any interrupt enabled in `sie`, whatever SIE), then SIE
/// set, so the interrupt is taken: no wake-up is lost after the caller's masked check.
pub fn enable_irqs_and_wait() {
    // SAFETY: waiting for an interrupt, then unmasking (a running hart: `stvec` is set).
    unsafe { asm!("wfi", "csrsi sstatus, 2", options(nostack)) };
}

/// Parks this hart forever with interrupts masked.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: parking the hart.
        unsafe { asm!("csrci sstatus, 2", "wfi", options(nomem, nostack)) };
    }
}

/// Spin-loop hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// The `time` CSR (10 MHz on QEMU `virt`).
#[inline(always)]
pub fn cycles() -> u64 {
    let v: u64;
    // SAFETY: reads the time CSR (OpenSBI lets S-mode read it, or emulates the read).
    unsafe { asm!("rdtime {}", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// The caller's program counter.
#[inline(never)]
pub fn current_pc() -> u64 {
    let v: u64;
    // SAFETY: `auipc` of the current instruction.
    unsafe { asm!("auipc {}, 0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// The stack pointer.
#[inline(always)]
pub fn current_sp() -> u64 {
    let v: u64;
    // SAFETY: reads sp.
    unsafe { asm!("mv {}, sp", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// `[bottom, top)` of the stack CPU `cpu`'s call IPI handler runs on: no separate interrupt
/// stack here, the handler runs on the interrupted stack (sp), which is CPU `cpu`'s kernel
/// stack (`KERNEL_STACK_BYTES`), shared with the task code it interrupted.
pub fn call_handler_stack(cpu: usize) -> (usize, usize) {
    crate::config::kernel_stack(cpu)
}

// ---- SBI ----

const SBI_EXT_IPI: usize = 0x0073_5049; // "sPI"
const SBI_EXT_HSM: usize = 0x0048_534D; // "HSM"

fn sbi(ext: usize, fid: usize, a0: usize, a1: usize, a2: usize) -> (isize, usize) {
    let (err, val): (isize, usize);
    // SAFETY: an SBI call (ecall to OpenSBI), which only reads its arguments.
    unsafe {
        asm!("ecall", inlateout("a0") a0 => err, inlateout("a1") a1 => val, in("a2") a2,
             in("a6") fid, in("a7") ext, options(nostack))
    };
    (err, val)
}

/// Kinds of IPI pending per hart (bit = `Ipi` index); the software interrupt says "look".
static PENDING: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

fn bit(ipi: Ipi) -> u32 {
    1 << (ipi as u32)
}

const KINDS: [Ipi; 4] = [Ipi::Call, Ipi::Wake, Ipi::Ping, Ipi::Pong];

fn sbi_send_ipi(mask: usize, base: usize) {
    sbi(SBI_EXT_IPI, 0, mask, base, 0);
}

/// Marks `ipi` pending for hart `hw` and raises its software interrupt (SBI `send_ipi`).
pub fn send_ipi(hw: u32, ipi: Ipi) {
    let h = hw as usize;
    if h >= MAX_CPUS {
        return;
    }
    PENDING[h].fetch_or(bit(ipi), Ordering::SeqCst);
    sbi_send_ipi(1 << h, 0);
}

/// Every other started hart in one SBI call (a hart mask).
pub fn send_ipi_all_but_self(ipi: Ipi) -> bool {
    let me = hw_id() as usize;
    let mut mask = 0usize;
    for c in crate::percpu::bits(crate::percpu::started_mask()) {
        let h = crate::percpu::CPUS[c].hw_id.load(Ordering::Relaxed) as usize;
        if h != me && h < MAX_CPUS {
            PENDING[h].fetch_or(bit(ipi), Ordering::SeqCst);
            mask |= 1 << h;
        }
    }
    if mask != 0 {
        sbi_send_ipi(mask, 0);
    }
    true
}

/// No NMI in S-mode (see the module notes).
pub const HAS_NMI: bool = false;

/// No NMI: nothing is sent.
pub fn send_nmi(_hw: u32) {}

/// No NMI.
pub fn send_nmi_all_but_self() -> bool {
    false
}

/// HSM `hart_get_status`: valid hart ids answer without error.
fn hart_exists(h: usize) -> bool {
    sbi(SBI_EXT_HSM, 2, h, 0, 0).0 == 0
}

static BOOT_HART: AtomicU32 = AtomicU32::new(0);

fn count_harts() -> usize {
    (0..MAX_CPUS).take_while(|&h| hart_exists(h)).count().max(1)
}

/// HSM `hart_start` for every hart but the boot one (opaque = CPU index).
pub fn start_secondaries(present: usize) {
    let boot = BOOT_HART.load(Ordering::Relaxed) as usize;
    let entry = boot::secondary_entry_addr() as usize;
    let mut cpu = 1;
    for h in 0..present.min(MAX_CPUS) {
        if h == boot {
            continue;
        }
        HART_OF_CPU[cpu].store(h as u32, Ordering::Relaxed);
        let (err, _) = sbi(SBI_EXT_HSM, 0, h, entry, cpu);
        if err != 0 {
            crate::println!("warning: SBI hart_start({h}) returned {err}");
        }
        cpu += 1;
    }
}

// ---- UART (16550 at 0x1000_0000) and exit (sifive_test at 0x10_0000) ----

const UART: usize = 0x1000_0000;

/// QEMU's 16550 needs no set-up.
pub fn console_init() {}

/// One byte to the UART (bounded wait for THR empty).
pub fn console_put(b: u8) {
    // SAFETY: the 16550's line-status (5) and transmit (0) registers.
    unsafe {
        let mut spins = 0;
        while core::ptr::read_volatile((UART + 5) as *const u8) & 0x20 == 0 && spins < 100_000 {
            spins += 1;
        }
        core::ptr::write_volatile(UART as *mut u8, b);
    }
}

/// `sifive_test`: 0x3333 | status << 16 makes QEMU exit with `status` (33 pass, 35 fail).
pub fn exit(success: bool) -> ! {
    let status: u32 = if success { 33 } else { 35 };
    // SAFETY: QEMU virt's test device; the write ends the VM.
    unsafe { core::ptr::write_volatile(0x10_0000 as *mut u32, 0x3333 | status << 16) };
    halt_forever()
}

// ---- Rust entries ----

/// The boot hart.
#[unsafe(no_mangle)]
extern "C" fn riscv_bsp_main(hart: usize, dtb: usize) -> ! {
    BOOT_HART.store(hart as u32, Ordering::Relaxed);
    HART_OF_CPU[0].store(hart as u32, Ordering::Relaxed);
    // SAFETY: CPU 0, first thing in Rust.
    unsafe { crate::percpu::init_this_cpu(0) };
    crate::console::init();
    crate::println!();
    crate::println!("smpcall bare-metal riscv64 kernel (S-mode, OpenSBI, QEMU virt)");
    crate::time::init(TIMEBASE_HZ);
    // SAFETY: OpenSBI passes the DTB's address in a1 (0 if none: `bootargs` checks), in RAM
    // that nothing writes afterwards.
    if let Some(args) = unsafe { crate::fdt::bootargs(dtb) } {
        crate::cmdline::parse(args);
    }
    let spec = sbi(0x10, 0, 0, 0, 0).1; // base extension: get_spec_version
    crate::println!(
        "boot: hart {hart}, SBI spec {}.{}, timebase {} Hz (time CSR), IPIs via SBI IPI, \
         no NMI in S-mode",
        spec >> 24,
        spec & 0xFF_FFFF,
        TIMEBASE_HZ
    );
    crate::kernel::bsp_main(count_harts())
}

/// Another hart (from `secondary_entry`).
#[unsafe(no_mangle)]
extern "C" fn riscv_secondary_main(hart: usize, cpu: usize) -> ! {
    HART_OF_CPU[cpu].store(hart as u32, Ordering::Relaxed);
    // SAFETY: `cpu` is the HSM opaque value the boot hart gave this hart only.
    unsafe { crate::percpu::init_this_cpu(cpu) };
    crate::kernel::secondary_main(cpu)
}

/// Every trap.
#[unsafe(no_mangle)]
extern "C" fn riscv_trap(frame: &mut boot::Frame) {
    let scause: usize;
    let stval: usize;
    // SAFETY: reads the trap cause and value.
    unsafe {
        asm!("csrr {}, scause", "csrr {}, stval", out(reg) scause, out(reg) stval,
             options(nomem, nostack, preserves_flags))
    };
    let interrupt = scause >> 63 != 0;
    let code = scause & 0xFF;
    if interrupt && code == 1 {
        // Supervisor software interrupt: clear SSIP first, then take the pending kinds (a
        // send after the swap raises SSIP again).
        // SAFETY: clearing this hart's SSIP.
        unsafe { asm!("csrc sip, {}", in(reg) 1usize << 1, options(nostack)) };
        let me = hw_id() as usize;
        let bits = PENDING.get(me).map_or(0, |p| p.swap(0, Ordering::SeqCst));
        for ipi in KINDS {
            if bits & bit(ipi) != 0 {
                crate::irq::handle(ipi);
            }
        }
        return;
    }
    if interrupt {
        crate::irq::unexpected();
        return;
    }
    crate::console::emergency(format_args!(
        "\nEXCEPTION scause {:#x} on cpu {:?}: sepc {:#x} stval {:#x} sstatus {:#x} ra {:#x} \
         sp {:#x}\n",
        scause,
        crate::percpu::current_index(),
        frame.sepc,
        stval,
        frame.sstatus,
        frame.x[1],
        frame as *const _ as u64 + boot::FRAME_BYTES
    ));
    exit(false)
}
