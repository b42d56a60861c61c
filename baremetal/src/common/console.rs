//! The serial console (the architecture's UART: COM1 on x86_64, PL011 on aarch64, the
//! 16550 of QEMU's riscv `virt`) and a fixed-size text buffer.
//!
//! Lines from several CPUs are kept whole by a lock taken with interrupts masked (so an
//! interrupt handler on the same CPU never waits for its own task). The lock is never waited
//! for unboundedly: `report` (engine diagnostics, any context) and the panic/exception path
//! give up after a bounded spin and print anyway, and a CPU that already holds the lock (an
//! exception in the middle of a line) prints straight through. A garbled line is better than a
//! deadlock.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::arch;

static OWNER: AtomicUsize = AtomicUsize::new(0);

/// Sets up the UART.
pub fn init() {
    arch::console_init();
}

struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            arch::console_put(b);
        }
        Ok(())
    }
}

fn me_tag() -> usize {
    crate::percpu::current_index().map_or(usize::MAX, |c| c + 1)
}

/// Takes the lock (bounded by `max_spins` if given); returns whether we must release it.
fn lock(max_spins: Option<u64>) -> bool {
    let me = me_tag();
    if OWNER.load(Ordering::Relaxed) == me {
        return false; // re-entered on this CPU (exception or NMI mid-line): print through
    }
    let mut spins = 0u64;
    loop {
        if OWNER
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return true;
        }
        spins += 1;
        if max_spins.is_some_and(|m| spins > m) {
            return false;
        }
        arch::pause();
    }
}

fn unlock() {
    OWNER.store(0, Ordering::Release);
}

fn print_with(args: fmt::Arguments<'_>, max_spins: Option<u64>) {
    let irq = arch::irq_save();
    let locked = lock(max_spins);
    let _ = Serial.write_fmt(args);
    if locked {
        unlock();
    }
    arch::irq_restore(irq);
}

/// `print!` backend.
pub fn print(args: fmt::Arguments<'_>) {
    print_with(args, Some(50_000_000));
}

/// For the engine's reports (any context, masked or in a handler): bounded lock.
pub fn report(args: fmt::Arguments<'_>) {
    print_with(
        format_args!(
            "[report cpu {:?}] {}\n",
            crate::percpu::current_index(),
            args
        ),
        Some(1_000_000),
    );
}

/// For panics and exceptions: short bounded lock, then print regardless.
pub fn emergency(args: fmt::Arguments<'_>) {
    print_with(args, Some(100_000));
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// A fixed-capacity text buffer (no allocator here): what tests return.
pub struct Buf {
    bytes: [u8; 512],
    len: usize,
}

impl Buf {
    /// Empty.
    pub const fn new() -> Self {
        Buf {
            bytes: [0; 512],
            len: 0,
        }
    }
    /// The text (truncated at capacity, on a character boundary).
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.bytes[..self.len]) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&self.bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }
    /// A buffer holding `args`.
    pub fn from_fmt(args: fmt::Arguments<'_>) -> Self {
        let mut b = Buf::new();
        let _ = b.write_fmt(args);
        b
    }
}

impl Write for Buf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.bytes.len() - self.len;
        let n = s.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl fmt::Display for Buf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A [`Buf`] from format arguments.
#[macro_export]
macro_rules! buf {
    ($($arg:tt)*) => { $crate::console::Buf::from_fmt(format_args!($($arg)*)) };
}
