//! Port I/O of a Linux guest that KVM does not handle in the kernel (the
//! PIC, PIT and speaker port are in-kernel): COM1, the CMOS clock, the i8042
//! reset line, PCI config mechanism #1 (0xCF8/0xCFC), and the probes of hardware this machine does not have, which
//! read as all ones (an empty ISA bus) and ignore writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use aivmm_devices::pci::conf1::Conf1;

use super::cmos::Cmos;
use super::serial::{SerialConsole, SerialError};

/// The POST diagnostic port, written as an I/O delay.
pub const POST_PORT: u16 = 0x80;
/// The i8042 keyboard controller: data and command/status.
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
/// i8042 command "pulse the reset line": how Linux (and BIOSes) reboot.
pub const I8042_RESET: u8 = 0xfe;

/// What a port write asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    Continue,
    /// The guest pulsed the reset line.
    Reset,
}

/// The legacy devices behind port I/O, shared by the vCPU threads.
pub struct PortBus {
    pub serial: Mutex<SerialConsole>,
    cmos: Mutex<Cmos>,
    /// The PCI bus's conf1 ports, when the guest has one.
    pci: Option<Conf1>,
    /// Accesses to ports no device answers (PCI config, floppy, VGA, ...).
    pub unhandled: AtomicU64,
}

impl PortBus {
    pub fn new(serial: SerialConsole) -> Self {
        PortBus {
            serial: Mutex::new(serial),
            cmos: Mutex::new(Cmos::default()),
            pci: None,
            unhandled: AtomicU64::new(0),
        }
    }

    /// Answers the conf1 ports with `conf1`.
    pub fn with_pci(mut self, conf1: Conf1) -> Self {
        self.pci = Some(conf1);
        self
    }

    /// The conf1 ports, if `port` is one of them and there is a PCI bus.
    fn pci_for(&self, port: u16) -> Option<&Conf1> {
        self.pci.as_ref().filter(|_| Conf1::handles(port))
    }

    /// An IN of `data.len()` bytes from `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        if let Some(conf1) = self.pci_for(port) {
            // A misaligned data-port access (a guest bug) reads all ones.
            if conf1.read(port, data).is_err() {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
            return;
        }
        let value = if SerialConsole::handles(port) {
            self.serial
                .lock()
                .map_or(0xff, |mut serial| serial.read(port))
        } else if Cmos::handles(port) {
            self.cmos.lock().map_or(0xff, |cmos| cmos.read(port))
        } else {
            // 0xff from the i8042 status port too: "no controller", so the
            // keyboard driver gives up at its first probe.
            if port != I8042_DATA && port != I8042_COMMAND {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
            }
            data.fill(0xff);
            return;
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// An OUT of `data` to `port`.
    pub fn write(&self, port: u16, data: &[u8]) -> Result<PioAction, SerialError> {
        if let Some(conf1) = self.pci_for(port) {
            if conf1.write(port, data).is_err() {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(PioAction::Continue);
        }
        let Some(&value) = data.first() else {
            return Ok(PioAction::Continue);
        };
        if SerialConsole::handles(port) {
            if let Ok(mut serial) = self.serial.lock() {
                serial.write(port, value)?;
            }
        } else if Cmos::handles(port) {
            if let Ok(mut cmos) = self.cmos.lock() {
                cmos.write(port, value);
            }
        } else if port == I8042_COMMAND && value == I8042_RESET {
            return Ok(PioAction::Reset);
        } else if port != POST_PORT {
            self.unhandled.fetch_add(1, Ordering::Relaxed);
        }
        Ok(PioAction::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::serial::{Capture, IrqLine};
    use std::sync::Arc;

    fn bus() -> (PortBus, Arc<Mutex<Capture>>) {
        let capture = Arc::new(Mutex::new(Capture {
            limit: 64,
            ..Default::default()
        }));
        let serial = SerialConsole::new(IrqLine::new().unwrap(), None, capture.clone());
        (PortBus::new(serial), capture)
    }

    #[test]
    fn ports_reach_their_devices() {
        let (bus, capture) = bus();
        assert_eq!(bus.write(0x3f8, b"A").unwrap(), PioAction::Continue);
        assert_eq!(capture.lock().unwrap().bytes, b"A");
        bus.write(0x70, &[0x0a]).unwrap();
        let mut byte = [0u8];
        bus.read(0x71, &mut byte);
        assert_eq!(byte[0] & 0x80, 0, "RTC update not in progress");
        assert_eq!(bus.write(0x64, &[0xfe]).unwrap(), PioAction::Reset);
        assert_eq!(bus.write(0x80, &[0x12]).unwrap(), PioAction::Continue);
        let mut dword = [0u8; 4];
        bus.read(0xcfc, &mut dword);
        assert_eq!(dword, [0xff; 4], "no PCI: config reads are all ones");
        assert_eq!(bus.unhandled.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn conf1_ports_reach_the_pci_bus() {
        let (bus, _) = bus();
        let pci = Arc::new(aivmm_devices::pci::PciBus::new());
        let bus = bus.with_pci(Conf1::new(pci));
        bus.write(0xcf8, &0x8000_0000u32.to_le_bytes()).unwrap();
        let mut dword = [0u8; 4];
        bus.read(0xcfc, &mut dword);
        assert_eq!(u32::from_le_bytes(dword), 0x0008_1b36, "the host bridge");
        let mut word = [0u8; 2];
        bus.read(0xcfd, &mut word);
        assert_eq!(word, [0xff; 2], "misaligned: all ones");
        assert_eq!(bus.unhandled.load(Ordering::Relaxed), 1);
    }
}
