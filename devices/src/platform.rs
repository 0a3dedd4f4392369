//! The platform device: the guest's few calls to its host (registers in
//! `aivmm_guest_abi::platform`). PARK blocks the calling vCPU's thread right
//! here until a wake is pending for that vCPU ([`VcpuWakers`]).

use std::mem::offset_of;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aivmm_guest_abi::{fatal, platform as reg, FatalReport, Report};
use vm_memory::{Bytes, GuestAddress};

use crate::bus::{fill, value_of, DeviceError, MmioAction, MmioDevice};
use crate::GuestMemory;

const NAME: &str = "platform";

/// A key/value the guest reported through the REPORT register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestReport {
    pub vcpu: u32,
    pub key: u64,
    pub value: u64,
}

struct WakeSlot {
    pending: Mutex<bool>,
    changed: Condvar,
    parks: AtomicU64,
    parked_nanos: AtomicU64,
}

/// One pending-wake flag per vCPU: a wake sets it, a park waits for it and
/// clears it. A wake that arrives before the park is therefore never lost.
pub struct VcpuWakers {
    slots: Vec<WakeSlot>,
    stopping: AtomicBool,
}

/// How long one vCPU spent parked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParkStats {
    pub parks: u64,
    pub parked: Duration,
}

impl VcpuWakers {
    pub fn new(vcpus: u32) -> Self {
        VcpuWakers {
            slots: (0..vcpus)
                .map(|_| WakeSlot {
                    pending: Mutex::new(false),
                    changed: Condvar::new(),
                    parks: AtomicU64::new(0),
                    parked_nanos: AtomicU64::new(0),
                })
                .collect(),
            stopping: AtomicBool::new(false),
        }
    }

    pub fn vcpu_count(&self) -> u32 {
        self.slots.len() as u32
    }

    fn pending(slot: &WakeSlot) -> MutexGuard<'_, bool> {
        // A poisoned flag is still a valid bool: keep going.
        slot.pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Makes a wake pending for `vcpu`; false if there is no such vCPU.
    pub fn wake(&self, vcpu: u32) -> bool {
        let Some(slot) = self.slots.get(vcpu as usize) else {
            return false;
        };
        *Self::pending(slot) = true;
        slot.changed.notify_one();
        true
    }

    pub fn wake_all(&self) {
        for vcpu in 0..self.vcpu_count() {
            self.wake(vcpu);
        }
    }

    /// Blocks until a wake is pending for `vcpu` (and consumes it) or the
    /// partition is stopping.
    pub fn park(&self, vcpu: u32) {
        let Some(slot) = self.slots.get(vcpu as usize) else {
            return;
        };
        let start = Instant::now();
        let mut pending = Self::pending(slot);
        while !*pending && !self.stopping.load(Ordering::Acquire) {
            pending = slot
                .changed
                .wait(pending)
                .unwrap_or_else(|poison| poison.into_inner());
        }
        *pending = false;
        drop(pending);
        slot.parks.fetch_add(1, Ordering::Relaxed);
        slot.parked_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Releases every parked vCPU thread now and every future park at once.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for slot in &self.slots {
            // Taking the lock orders the flag before a parker's next check.
            drop(Self::pending(slot));
            slot.changed.notify_all();
        }
    }

    pub fn stats(&self, vcpu: u32) -> ParkStats {
        self.slots
            .get(vcpu as usize)
            .map(|slot| ParkStats {
                parks: slot.parks.load(Ordering::Relaxed),
                parked: Duration::from_nanos(slot.parked_nanos.load(Ordering::Relaxed)),
            })
            .unwrap_or_default()
    }
}

/// The platform device of one partition.
pub struct PlatformDevice {
    memory: GuestMemory,
    wakers: std::sync::Arc<VcpuWakers>,
    boot_complete: Mutex<Option<Instant>>,
    boot_complete_changed: Condvar,
    reports: Mutex<Vec<GuestReport>>,
    pings: AtomicU64,
}

impl PlatformDevice {
    pub fn new(memory: GuestMemory, wakers: std::sync::Arc<VcpuWakers>) -> Self {
        PlatformDevice {
            memory,
            wakers,
            boot_complete: Mutex::new(None),
            boot_complete_changed: Condvar::new(),
            reports: Mutex::new(Vec::new()),
            pings: AtomicU64::new(0),
        }
    }

    /// When the guest first wrote BOOT_COMPLETE.
    pub fn boot_complete_at(&self) -> Option<Instant> {
        *self
            .boot_complete
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Waits up to `timeout` for BOOT_COMPLETE.
    pub fn wait_boot_complete(&self, timeout: Duration) -> Option<Instant> {
        let guard = self
            .boot_complete
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let (guard, _) = self
            .boot_complete_changed
            .wait_timeout_while(guard, timeout, |at| at.is_none())
            .unwrap_or_else(|poison| poison.into_inner());
        *guard
    }

    /// Everything the guest reported so far, in order.
    pub fn reports(&self) -> Vec<GuestReport> {
        self.reports
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    pub fn pings(&self) -> u64 {
        self.pings.load(Ordering::Relaxed)
    }

    fn read_u64(&self, addr: u64) -> Result<u64, DeviceError> {
        self.memory
            .read_obj::<u64>(GuestAddress(addr))
            .map_err(|source| DeviceError::GuestMemory {
                device: NAME,
                addr,
                source,
            })
    }

    fn fatal_report(&self, addr: u64) -> Result<MmioAction, DeviceError> {
        let code = self.read_u64(addr + offset_of!(FatalReport, code) as u64)?;
        let message_addr = self.read_u64(addr + offset_of!(FatalReport, message_addr) as u64)?;
        let message_len = self.read_u64(addr + offset_of!(FatalReport, message_len) as u64)?;
        let mut message = vec![0u8; message_len.min(fatal::MAX_MESSAGE) as usize];
        let message = match self
            .memory
            .read_slice(&mut message, GuestAddress(message_addr))
        {
            Ok(()) => String::from_utf8_lossy(&message).into_owned(),
            Err(error) => format!(
                "<message at {message_addr:#x} ({message_len} bytes) is not readable: {error}>"
            ),
        };
        Ok(MmioAction::Fatal { code, message })
    }

    fn record_report(&self, vcpu: u32, addr: u64) -> Result<(), DeviceError> {
        let key = self.read_u64(addr + offset_of!(Report, key) as u64)?;
        let value = self.read_u64(addr + offset_of!(Report, value) as u64)?;
        self.reports
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .push(GuestReport { vcpu, key, value });
        Ok(())
    }
}

impl MmioDevice for PlatformDevice {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read(&self, _vcpu: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match offset {
            reg::MAGIC if data.len() <= 8 => {
                fill(data, reg::PLATFORM_MAGIC);
                Ok(())
            }
            _ => Err(DeviceError::BadAccess {
                device: NAME,
                access: "read",
                offset,
                len: data.len(),
            }),
        }
    }

    fn write(&self, vcpu: u32, offset: u64, data: &[u8]) -> Result<MmioAction, DeviceError> {
        if data.is_empty() || data.len() > 8 {
            return Err(DeviceError::BadAccess {
                device: NAME,
                access: "write",
                offset,
                len: data.len(),
            });
        }
        let value = value_of(data);
        match offset {
            reg::BOOT_COMPLETE => {
                let mut at = self
                    .boot_complete
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner());
                if at.is_none() {
                    *at = Some(Instant::now());
                    self.boot_complete_changed.notify_all();
                }
            }
            reg::EXIT => return Ok(MmioAction::Exit { status: value }),
            reg::FATAL => return self.fatal_report(value),
            reg::PARK => self.wakers.park(vcpu),
            reg::WAKE if value == reg::WAKE_ALL => self.wakers.wake_all(),
            reg::WAKE => {
                let vcpu = u32::try_from(value).unwrap_or(u32::MAX);
                if !self.wakers.wake(vcpu) {
                    return Err(DeviceError::BadValue {
                        device: NAME,
                        offset,
                        value,
                        why: "no vCPU with that index",
                    });
                }
            }
            reg::REPORT => self.record_report(vcpu, value)?,
            // PING_IOEVENTFD only gets here if the VMM has no ioeventfd on it.
            reg::PING | reg::PING_IOEVENTFD => {
                self.pings.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                return Err(DeviceError::BadAccess {
                    device: NAME,
                    access: "write",
                    offset,
                    len: data.len(),
                })
            }
        }
        Ok(MmioAction::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn device() -> (PlatformDevice, Arc<VcpuWakers>) {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let wakers = Arc::new(VcpuWakers::new(2));
        (PlatformDevice::new(memory, wakers.clone()), wakers)
    }

    #[test]
    fn a_wake_before_the_park_is_not_lost() {
        let (device, wakers) = device();
        assert_eq!(
            device.write(0, reg::WAKE, &1u64.to_le_bytes()).unwrap(),
            MmioAction::Continue
        );
        // Returns at once: the wake is pending.
        device.write(1, reg::PARK, &0u64.to_le_bytes()).unwrap();
        assert_eq!(wakers.stats(1).parks, 1);
    }

    #[test]
    fn a_park_waits_for_another_threads_wake() {
        let (device, wakers) = device();
        let device = Arc::new(device);
        let parker = {
            let device = device.clone();
            std::thread::spawn(move || device.write(1, reg::PARK, &[0; 8]).unwrap())
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!parker.is_finished());
        wakers.wake(1);
        parker.join().unwrap();
        assert!(wakers.stats(1).parked >= Duration::from_millis(10));
    }

    #[test]
    fn stop_releases_parked_vcpus() {
        let (device, wakers) = device();
        let device = Arc::new(device);
        let parker = {
            let device = device.clone();
            std::thread::spawn(move || device.write(0, reg::PARK, &[0; 8]).unwrap())
        };
        std::thread::sleep(Duration::from_millis(10));
        wakers.stop();
        parker.join().unwrap();
    }

    #[test]
    fn fatal_and_report_read_their_structures_from_guest_memory() {
        let (device, _) = device();
        let message = b"out of cheese";
        device
            .memory
            .write_slice(message, GuestAddress(0x2000))
            .unwrap();
        let report = [7u64, 0x2000, message.len() as u64];
        for (i, word) in report.iter().enumerate() {
            device
                .memory
                .write_obj(*word, GuestAddress(0x1000 + 8 * i as u64))
                .unwrap();
        }
        let action = device
            .write(0, reg::FATAL, &0x1000u64.to_le_bytes())
            .unwrap();
        assert_eq!(
            action,
            MmioAction::Fatal {
                code: 7,
                message: "out of cheese".into()
            }
        );

        device.memory.write_obj(3u64, GuestAddress(0x3000)).unwrap();
        device
            .memory
            .write_obj(99u64, GuestAddress(0x3008))
            .unwrap();
        device
            .write(1, reg::REPORT, &0x3000u64.to_le_bytes())
            .unwrap();
        assert_eq!(
            device.reports(),
            vec![GuestReport {
                vcpu: 1,
                key: 3,
                value: 99
            }]
        );

        let error = device
            .write(0, reg::REPORT, &0x1_0000_0000u64.to_le_bytes())
            .unwrap_err();
        assert!(matches!(
            error,
            DeviceError::GuestMemory {
                addr: 0x1_0000_0000,
                ..
            }
        ));
    }

    #[test]
    fn unknown_registers_and_vcpus_are_guest_errors() {
        let (device, _) = device();
        assert!(device.write(0, 0x400, &[0; 8]).is_err());
        assert!(device.write(0, reg::WAKE, &5u64.to_le_bytes()).is_err());
        let mut data = [0u8; 8];
        device.read(0, reg::MAGIC, &mut data).unwrap();
        assert_eq!(u64::from_le_bytes(data), reg::PLATFORM_MAGIC);
        assert!(device.read(0, reg::EXIT, &mut data).is_err());
    }
}
