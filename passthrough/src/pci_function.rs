//! A passed-through device as a function on the VMM's PCI bus: guest config
//! accesses (from ECAM exits) go to its [`VirtualConfigSpace`], and what
//! they change (BAR moves, MSI/MSI-X programming) queues up for the VMM to
//! act on after the exit.

use std::sync::Mutex;

use aivmm_devices::bus::DeviceError;
use aivmm_devices::pci::PciFunction;

use crate::config_space::{ConfigChange, ConfigError, DeviceConfig, VirtualConfigSpace};

pub struct PassthroughFunction<D: DeviceConfig> {
    space: Mutex<VirtualConfigSpace<D>>,
    changes: Mutex<Vec<ConfigChange>>,
}

impl<D: DeviceConfig> PassthroughFunction<D> {
    pub fn new(space: VirtualConfigSpace<D>) -> Self {
        PassthroughFunction {
            space: Mutex::new(space),
            changes: Mutex::new(Vec::new()),
        }
    }

    /// The changes made since the last call, oldest first.
    pub fn take_changes(&self) -> Vec<ConfigChange> {
        std::mem::take(&mut *lock(&self.changes))
    }

    /// Runs `f` on the config space (for the VMM's own reads of it).
    pub fn with_space<T>(&self, f: impl FnOnce(&VirtualConfigSpace<D>) -> T) -> T {
        f(&lock(&self.space))
    }
}

/// A poisoned lock means a panic elsewhere already; the data is still the
/// last consistent state, so carry on with it rather than panic again.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn device_error(error: ConfigError, access: &'static str) -> DeviceError {
    match error {
        ConfigError::BadAccess { offset, len } => DeviceError::BadAccess {
            device: "pci-passthrough",
            access,
            offset: u64::from(offset),
            len,
        },
        // Only BadAccess can come from a guest access.
        _ => DeviceError::BadValue {
            device: "pci-passthrough",
            offset: 0,
            value: 0,
            why: "unexpected config-space error",
        },
    }
}

impl<D: DeviceConfig> PciFunction for PassthroughFunction<D> {
    fn name(&self) -> &'static str {
        "pci-passthrough"
    }

    fn read_config(&self, offset: u16, data: &mut [u8]) -> Result<(), DeviceError> {
        lock(&self.space)
            .read(offset, data)
            .map_err(|e| device_error(e, "config read"))
    }

    fn write_config(&self, offset: u16, data: &[u8]) -> Result<(), DeviceError> {
        let changes = lock(&self.space)
            .write(offset, data)
            .map_err(|e| device_error(e, "config write"))?;
        lock(&self.changes).extend(changes);
        Ok(())
    }
}
