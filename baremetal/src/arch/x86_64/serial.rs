//! COM1 (0x3f8), a 16550 UART.

use super::cpu::{inb, outb};

const COM1: u16 = 0x3f8;

/// Programs COM1: 115200 baud, 8N1, FIFO on.
pub fn init() {
    // SAFETY: the standard 16550 programming sequence on COM1.
    unsafe {
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x80);
        outb(COM1, 0x01);
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03);
        outb(COM1 + 2, 0xC7);
        outb(COM1 + 4, 0x03);
    }
}

/// Writes one byte (bounded wait for the transmitter).
pub fn put(b: u8) {
    // SAFETY: COM1's line-status and transmit registers.
    unsafe {
        let mut spins = 0;
        while inb(COM1 + 5) & 0x20 == 0 && spins < 100_000 {
            spins += 1;
        }
        outb(COM1, b);
    }
}
