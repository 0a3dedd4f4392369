//! The virtio-mmio (version 2) transport as the guest drivers use it: register
//! access and the feature handshake every device starts with.

use aivmm_guest_abi::{fatal, virtio_mmio as reg};

pub fn read32(mmio: u64, offset: u64) -> u32 {
    // SAFETY: `mmio` is a device's register page from the boot info; a load
    // there is a request to the VMM, not a memory access.
    unsafe { core::ptr::read_volatile((mmio + offset) as *const u32) }
}

pub fn write32(mmio: u64, offset: u64, value: u32) {
    // SAFETY: as in `read32`.
    unsafe { core::ptr::write_volatile((mmio + offset) as *mut u32, value) }
}

/// A device that does not behave as the driver expects ends the partition.
pub fn device_error(what: &str) -> ! {
    crate::platform::fatal(fatal::DEVICE, what)
}

/// Resets the device at `mmio`, checks it is a version-2 `device_id` and
/// negotiates VIRTIO_F_VERSION_1 (the only feature our drivers take). The
/// queues are set up by the caller, then DRIVER_OK.
pub fn negotiate(mmio: u64, device_id: u32, name: &str) {
    let fail = |what: &str| -> ! {
        crate::platform::fatal_fmt(fatal::DEVICE, format_args!("{name}: {what}"))
    };
    if read32(mmio, reg::MAGIC_VALUE) != reg::MAGIC
        || read32(mmio, reg::VERSION) != reg::TRANSPORT_VERSION
        || read32(mmio, reg::DEVICE_ID) != device_id
    {
        fail("no virtio-mmio version 2 device of this kind at the address in the boot info");
    }
    write32(mmio, reg::STATUS, 0);
    write32(mmio, reg::STATUS, reg::STATUS_ACKNOWLEDGE);
    write32(
        mmio,
        reg::STATUS,
        reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER,
    );
    write32(mmio, reg::DEVICE_FEATURES_SEL, 1);
    let version_1 = 1 << (reg::F_VERSION_1 - 32);
    if read32(mmio, reg::DEVICE_FEATURES) & version_1 == 0 {
        fail("the device does not offer VIRTIO_F_VERSION_1");
    }
    // Only VIRTIO_F_VERSION_1 is taken; the low feature word stays 0 from the reset.
    write32(mmio, reg::DRIVER_FEATURES_SEL, 1);
    write32(mmio, reg::DRIVER_FEATURES, version_1);
    let features_ok = reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER | reg::STATUS_FEATURES_OK;
    write32(mmio, reg::STATUS, features_ok);
    if read32(mmio, reg::STATUS) & reg::STATUS_FEATURES_OK == 0 {
        fail("the device refused the negotiated features");
    }
}

/// Tells the device the driver is ready (after its queues are set up).
pub fn driver_ok(mmio: u64) {
    let status = reg::STATUS_ACKNOWLEDGE | reg::STATUS_DRIVER | reg::STATUS_FEATURES_OK;
    write32(mmio, reg::STATUS, status | reg::STATUS_DRIVER_OK);
}
