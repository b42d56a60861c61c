//! What every architecture's interrupt entry calls once it knows which IPI arrived (and
//! before or after its own acknowledge / end-of-interrupt, as its controller requires).

use crate::config::Ipi;

/// Runs the handler of `ipi` on the current CPU (interrupts masked).
pub fn handle(ipi: Ipi) {
    match ipi {
        Ipi::Call => {
            if let Some(engine) = crate::platform::try_engine() {
                // SAFETY: the kernel's cross-CPU call interrupt on this CPU: interrupt context
                // may run every call (the kernel's own rules for interrupt handlers).
                unsafe { engine.handle_ipi() };
            }
        }
        Ipi::Wake => crate::percpu::this().count_wake(),
        Ipi::Ping => crate::bench::on_ping(),
        Ipi::Pong => crate::bench::on_pong(),
    }
}

/// An interrupt nobody expects (counted; the `no-stray-interrupts` test checks).
pub fn unexpected() {
    if crate::percpu::current_index().is_some() {
        crate::percpu::this().count_unexpected();
    }
}
