//! COM1: vm-superio's 16550A UART at I/O port 0x3f8 on IRQ 4. What the guest
//! transmits goes to a sink (stdout or a log file) and into a bounded
//! capture the VMM can search (for "Linux version", say); what the host
//! types goes into its receive FIFO ([`SerialConsole::enqueue_input`]).

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1's I/O ports and ISA IRQ.
pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_PORTS: u16 = 8;
pub const COM1_IRQ: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot create the serial port's interrupt eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("the serial port cannot write its output: {0:?}")]
    Output(vm_superio::serial::Error<std::io::Error>),
}

/// Raises the UART's interrupt line: a write to an eventfd that KVM turns
/// into IRQ 4 (registered as an irqfd).
pub struct IrqLine(EventFd);

impl IrqLine {
    pub fn new() -> Result<Self, SerialError> {
        EventFd::new(libc::EFD_NONBLOCK)
            .map(IrqLine)
            .map_err(SerialError::EventFd)
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Everything the guest printed, up to a limit (the first bytes are kept:
/// the boot banner is what callers look for).
#[derive(Default)]
pub struct Capture {
    pub bytes: Vec<u8>,
    pub limit: usize,
    /// Bytes the guest wrote in all, kept or not.
    pub total: u64,
}

/// The UART's output: the sink and the capture.
pub struct ConsoleOut {
    sink: Option<Box<dyn Write + Send>>,
    capture: Arc<Mutex<Capture>>,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut capture) = self.capture.lock() {
            let room = capture.limit.saturating_sub(capture.bytes.len());
            let kept = buf.len().min(room);
            capture.bytes.extend_from_slice(&buf[..kept]);
            capture.total += buf.len() as u64;
        }
        if let Some(sink) = &mut self.sink {
            // A console nobody reads any more (a closed pipe) must not stop the guest.
            if sink.write_all(buf).and_then(|()| sink.flush()).is_err() {
                self.sink = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The guest's serial console.
pub struct SerialConsole {
    uart: Serial<IrqLine, NoEvents, ConsoleOut>,
}

impl SerialConsole {
    pub fn new(
        irq: IrqLine,
        sink: Option<Box<dyn Write + Send>>,
        capture: Arc<Mutex<Capture>>,
    ) -> Self {
        SerialConsole {
            uart: Serial::new(irq, ConsoleOut { sink, capture }),
        }
    }

    pub fn handles(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read((port - COM1_BASE) as u8)
    }

    pub fn write(&mut self, port: u16, value: u8) -> Result<(), SerialError> {
        self.uart
            .write((port - COM1_BASE) as u8, value)
            .map_err(SerialError::Output)
    }

    /// Puts as much of `input` as the 64-byte receive FIFO has room for in
    /// it (data ready, and the receive interrupt if the guest enabled it);
    /// returns how many bytes went in, 0 while the guest has not read the
    /// FIFO. An interrupt that could not be raised loses no byte: the guest
    /// sees "data ready" at its next poll of the line status.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(input.len());
        match self.uart.enqueue_raw_bytes(&input[..room]) {
            Ok(count) => count,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(_) => room,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_reach_the_capture_and_raise_the_irq() {
        let capture = Arc::new(Mutex::new(Capture {
            limit: 4,
            ..Default::default()
        }));
        let irq = IrqLine::new().unwrap();
        let event = irq.eventfd().try_clone().unwrap();
        let mut serial = SerialConsole::new(irq, None, capture.clone());
        // Enable the "transmitter holding register empty" interrupt (IER bit 1).
        serial.write(COM1_BASE + 1, 0x02).unwrap();
        for &byte in b"Linux" {
            serial.write(COM1_BASE, byte).unwrap();
        }
        let capture = capture.lock().unwrap();
        assert_eq!(
            capture.bytes, b"Linu",
            "bounded capture keeps the first bytes"
        );
        assert_eq!(capture.total, 5);
        assert!(event.read().unwrap() >= 1, "IRQ 4 was triggered");
        // LSR: transmitter empty, as a guest polling it before each byte expects.
        assert!(serial.read(COM1_BASE + 5) & 0x20 != 0);
        assert!(SerialConsole::handles(0x3fd) && !SerialConsole::handles(0x2f8));
    }

    #[test]
    fn input_reaches_the_receive_fifo_and_raises_the_irq() {
        let capture = Arc::new(Mutex::new(Capture::default()));
        let irq = IrqLine::new().unwrap();
        let event = irq.eventfd().try_clone().unwrap();
        let mut serial = SerialConsole::new(irq, None, capture);
        // Enable the "received data available" interrupt (IER bit 0), as
        // Linux's 8250 driver does when ttyS0 is opened.
        serial.write(COM1_BASE + 1, 0x01).unwrap();
        assert_eq!(serial.read(COM1_BASE + 5) & 0x01, 0, "no data yet");
        assert_eq!(serial.enqueue_input(b"ls\r"), 3);
        assert!(event.read().unwrap() >= 1, "IRQ 4 was triggered");
        // IIR says "received data available", LSR "data ready".
        assert_eq!(serial.read(COM1_BASE + 2) & 0x0f, 0x04);
        let mut received = Vec::new();
        while serial.read(COM1_BASE + 5) & 0x01 != 0 {
            received.push(serial.read(COM1_BASE));
        }
        assert_eq!(received, b"ls\r");

        // The FIFO holds 64 bytes; the rest waits for the guest to read.
        let long = [b'x'; 100];
        assert_eq!(serial.enqueue_input(&long), 64);
        assert_eq!(serial.enqueue_input(&long[64..]), 0);
        serial.read(COM1_BASE);
        assert_eq!(serial.enqueue_input(&long[64..]), 1);
    }
}
