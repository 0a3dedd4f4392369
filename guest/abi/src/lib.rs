//! The guest ABI of aivmm: everything the VMM and the inference kernel must
//! agree on, in one place. `docs/guest-abi.md` describes the same contract in
//! prose.
//!
//! The inference kernel runs entirely at CPL3 in 64-bit mode with paging on
//! and an identity map (guest-virtual address == guest-physical address). It
//! never executes a privileged instruction. It talks to the VMM through:
//! - the [`BootInfo`] page (read-only to the guest),
//! - the platform registers ([`platform`]): boot complete, exit, fatal error,
//!   park / wake, reports,
//! - a virtio-mmio console ([`virtio_mmio`], [`console`]),
//! - the read-only model window ([`layout::MODEL_WINDOW_ADDR`]).
//!
//! All structures are `#[repr(C)]`, little-endian, and only grow at the end
//! (a change in meaning bumps [`ABI_VERSION`]).
#![no_std]

/// Version of this contract; the guest refuses a [`BootInfo`] with another one.
pub const ABI_VERSION: u32 = 1;

/// Most vCPUs a partition can have.
pub const MAX_VCPUS: u32 = 64;

/// Where things are in guest-physical (== guest-virtual) memory.
pub mod layout {
    /// Size of a small page.
    pub const PAGE_SIZE: u64 = 0x1000;
    /// Size of a large (2 MiB) page; guest RAM sizes are multiples of it.
    pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;
    /// Size of a huge (1 GiB) page.
    pub const HUGE_PAGE_SIZE: u64 = 0x4000_0000;

    /// The global descriptor table (one page, not accessible at CPL3).
    pub const GDT_ADDR: u64 = 0x1000;
    /// The 64-bit task-state segment (one page, not accessible at CPL3).
    pub const TSS_ADDR: u64 = 0x2000;
    /// The interrupt descriptor table: empty (limit 0), so any exception ends
    /// in a triple fault that the VMM reports.
    pub const IDT_ADDR: u64 = 0x3000;
    /// The [`crate::BootInfo`] page, mapped read-only at CPL3. Also passed in RDI.
    pub const BOOT_INFO_ADDR: u64 = 0x4000;
    /// First byte of the page-table area (not mapped into the guest).
    pub const PAGE_TABLES_ADDR: u64 = 0x1_0000;
    /// One past the last byte of the page-table area.
    pub const PAGE_TABLES_END: u64 = 0x10_0000;
    /// Where the kernel ELF is linked and loaded (1 MiB).
    pub const KERNEL_LOAD_ADDR: u64 = 0x10_0000;

    /// Guest RAM is `[0, ram_size)`; it may not reach the MMIO region.
    pub const RAM_MAX: u64 = MMIO_BASE;
    /// Base of the MMIO region (60 GiB): device registers, no memory behind it.
    pub const MMIO_BASE: u64 = 0xF_0000_0000;
    /// Size of the MMIO region (one large page).
    pub const MMIO_SIZE: u64 = 0x20_0000;
    /// The platform device registers ([`crate::platform`]), one page.
    pub const PLATFORM_MMIO_ADDR: u64 = MMIO_BASE;
    /// The virtio-mmio console ([`crate::console`]), one page.
    pub const CONSOLE_MMIO_ADDR: u64 = MMIO_BASE + 0x1000;
    /// Size of each device's register window.
    pub const DEVICE_MMIO_SIZE: u64 = 0x1000;

    /// The model window (64 GiB): the model file, mapped read-only. A guest
    /// write anywhere in it ends the partition with a fault report.
    pub const MODEL_WINDOW_ADDR: u64 = 0x10_0000_0000;
    /// Largest model file the window can hold (64 GiB).
    pub const MODEL_WINDOW_MAX: u64 = 0x10_0000_0000;
}

/// Value of [`BootInfo::magic`] ("AIVMBOOT" read as little-endian bytes).
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"AIVMBOOT");

/// What the VMM tells the guest at entry. Lives at [`layout::BOOT_INFO_ADDR`];
/// every vCPU gets its address in RDI and its own index in RSI, and starts at
/// the ELF entry point with RSP = its stack top - 8 (SysV call alignment).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// Always [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// Always [`ABI_VERSION`].
    pub abi_version: u32,
    /// Number of vCPUs; vCPU 0 is the boot vCPU, the others are workers.
    pub vcpu_count: u32,
    /// Bytes of guest RAM, starting at guest-physical 0.
    pub ram_size: u64,
    /// First byte of the heap (page aligned; after the kernel image).
    pub heap_start: u64,
    /// One past the last byte of the heap (page aligned; below the stacks).
    pub heap_end: u64,
    /// Bytes of stack per vCPU; each stack has an unmapped guard page below it.
    pub stack_size: u64,
    /// Lowest address of the per-vCPU stacks area (the stack of vCPU i has its
    /// top at `ram_size - i * (stack_size + PAGE_SIZE)`).
    pub stacks_start: u64,
    /// TSC frequency in kHz (from KVM_GET_TSC_KHZ), so the guest need not calibrate.
    pub tsc_khz: u64,
    /// Guest-physical address of the platform registers ([`platform`]).
    pub platform_mmio: u64,
    /// Guest-physical address of the virtio-mmio console ([`console`]).
    pub console_mmio: u64,
    /// Guest-physical address of the model window (0 when no model is mapped).
    pub model_addr: u64,
    /// Exact length in bytes of the model file in the window (0 = no model).
    /// The mapped window is this rounded up to a page; the tail reads as zero.
    pub model_size: u64,
    /// Debug requests for tests, a set of `debug::*` bits (0 in production).
    pub debug_flags: u64,
    /// The vCPU that carries out the fault-type requests in `debug_flags`.
    pub debug_vcpu: u32,
    /// Reserved, zero.
    pub reserved0: u32,
    /// Self-test: number of u32 elements of the parallel SIMD checksum (0 = skip).
    /// The result is reported as [`report::SELFTEST_CHECKSUM`].
    pub selftest_elements: u64,
    /// Benchmark: number of MMIO round trips to time (0 = skip); reported as
    /// [`report::MMIO_EXIT_TSC`] and [`report::IOEVENTFD_EXIT_TSC`].
    pub bench_mmio_exits: u64,
    /// Benchmark: bytes of fresh heap to touch page by page (0 = skip);
    /// reported as [`report::FIRST_TOUCH_TSC_PER_PAGE`] and
    /// [`report::SECOND_TOUCH_TSC_PER_PAGE`].
    pub bench_touch_bytes: u64,
}

/// Bits of [`BootInfo::debug_flags`]: deliberate failures, so that tests can
/// check that each kind of guest failure is reported (never set in production).
pub mod debug {
    /// vCPU `debug_vcpu` stores to an unmapped address (0x8), a page fault
    /// that ends in a triple fault (KVM_EXIT_SHUTDOWN).
    pub const FAULT_NOW: u64 = 1 << 0;
    /// vCPU `debug_vcpu` stores into the read-only model window.
    pub const WRITE_MODEL_WINDOW: u64 = 1 << 1;
    /// vCPU `debug_vcpu` panics; the panic handler reports it through the
    /// platform FATAL register.
    pub const PANIC: u64 = 1 << 2;
    /// vCPU `debug_vcpu` spins forever (after boot complete, if it is vCPU 0),
    /// so that tests can check that a stuck partition is stopped on time.
    pub const HANG: u64 = 1 << 3;
    /// The address stored to by [`FAULT_NOW`].
    pub const FAULT_ADDRESS: u64 = 0x8;
}

/// The platform device: 64-bit registers at [`layout::PLATFORM_MMIO_ADDR`].
/// Every access is one VM exit (tens of microseconds on nested KVM), so none of
/// these belongs in a hot loop except PARK, which is only used when idle.
pub mod platform {
    /// R: [`PLATFORM_MAGIC`].
    pub const MAGIC: u64 = 0x00;
    /// W (any value): the kernel has booted; the VMM timestamps it.
    pub const BOOT_COMPLETE: u64 = 0x08;
    /// W (status): the guest is done; the partition ends with this exit status.
    pub const EXIT: u64 = 0x10;
    /// W (guest-physical address of a [`crate::FatalReport`]): the guest hit an
    /// unrecoverable error; the partition ends with its code and message.
    pub const FATAL: u64 = 0x18;
    /// W (any value): block this vCPU until a wake for it is pending (one
    /// already pending makes PARK return at once; each PARK consumes it).
    pub const PARK: u64 = 0x20;
    /// W (vCPU index, or [`WAKE_ALL`]): make a wake pending for that vCPU.
    pub const WAKE: u64 = 0x28;
    /// W (guest-physical address of a [`crate::Report`]): record a key/value
    /// measurement or result for the host.
    pub const REPORT: u64 = 0x30;
    /// W (any value): does nothing but count; used to time a VM exit.
    pub const PING: u64 = 0x38;
    /// W (any value): like PING, but the VMM puts an ioeventfd on it, so KVM
    /// completes the write in the kernel without returning to the VMM: it
    /// times the cheaper kind of exit that queue notifications can use.
    pub const PING_IOEVENTFD: u64 = 0x40;
    /// Value read from [`MAGIC`] ("AIVMPLAT" as little-endian bytes).
    pub const PLATFORM_MAGIC: u64 = u64::from_le_bytes(*b"AIVMPLAT");
    /// [`WAKE`] value that wakes every vCPU.
    pub const WAKE_ALL: u64 = u64::MAX;
}

/// What the guest hands to [`platform::FATAL`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FatalReport {
    /// One of the `fatal::*` codes.
    pub code: u64,
    /// Guest-physical address of a UTF-8 message (need not be terminated).
    pub message_addr: u64,
    /// Length of the message in bytes (the VMM reads at most [`fatal::MAX_MESSAGE`]).
    pub message_len: u64,
}

/// Codes of [`FatalReport::code`].
pub mod fatal {
    /// A Rust panic in the guest; the message is the panic message and location.
    pub const PANIC: u64 = 1;
    /// The boot info was not what this kernel understands (magic or version).
    pub const BAD_BOOT_INFO: u64 = 2;
    /// The heap is exhausted.
    pub const OUT_OF_MEMORY: u64 = 3;
    /// A device did not behave as the guest driver expects.
    pub const DEVICE: u64 = 4;
    /// Longest message the VMM reads.
    pub const MAX_MESSAGE: u64 = 4096;
}

/// What the guest hands to [`platform::REPORT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One of the `report::*` keys.
    pub key: u64,
    /// The value; its unit depends on the key.
    pub value: u64,
}

/// Keys of [`Report::key`].
pub mod report {
    /// Result of the self-test checksum (see [`crate::selftest`]).
    pub const SELFTEST_CHECKSUM: u64 = 1;
    /// SIMD level the self-test used: one of `crate::selftest::SIMD_*`.
    pub const SELFTEST_SIMD: u64 = 2;
    /// Average TSC ticks per MMIO round trip through the VMM (PING writes).
    pub const MMIO_EXIT_TSC: u64 = 3;
    /// Average TSC ticks to touch a never-touched 4 KiB heap page.
    pub const FIRST_TOUCH_TSC_PER_PAGE: u64 = 4;
    /// Average TSC ticks to touch the same pages again.
    pub const SECOND_TOUCH_TSC_PER_PAGE: u64 = 5;
    /// TSC ticks from the boot vCPU's entry to its BOOT_COMPLETE write.
    pub const BOOT_TSC: u64 = 6;
    /// The first 8 bytes of the model window (little-endian), read by the
    /// guest at boot when a model of at least 8 bytes is mapped.
    pub const MODEL_FIRST_BYTES: u64 = 7;
    /// Average TSC ticks per ioeventfd-completed write (PING_IOEVENTFD).
    pub const IOEVENTFD_EXIT_TSC: u64 = 8;
}

/// The self-test the guest runs when [`BootInfo::selftest_elements`] is set: a
/// checksum that the host recomputes, so that SIMD state, allocation and the
/// worker vCPUs are all checked end to end.
pub mod selftest {
    /// The checksum used scalar code.
    pub const SIMD_SCALAR: u64 = 0;
    /// The checksum used AVX2.
    pub const SIMD_AVX2: u64 = 1;
    /// The checksum used AVX-512F.
    pub const SIMD_AVX512: u64 = 2;

    /// Element `i` of the self-test input.
    pub const fn element(i: u32) -> u32 {
        i.wrapping_mul(0x9E37_79B1) ^ (i >> 3)
    }

    /// Per-element mix whose wrapping sum and xor make up the checksum.
    pub const fn mix(value: u32) -> u32 {
        (value ^ (value >> 15)).wrapping_mul(0x2C1B_3C6D)
    }

    /// Combines the wrapping sum and the xor of `mix(element(i))` over all `i`.
    pub const fn combine(sum: u32, xor: u32) -> u64 {
        ((sum as u64) << 32) | xor as u64
    }

    /// The reference checksum of `n` elements, computed the slow way.
    pub fn reference(n: u32) -> u64 {
        let mut sum = 0u32;
        let mut xor = 0u32;
        let mut i = 0;
        while i < n {
            let m = mix(element(i));
            sum = sum.wrapping_add(m);
            xor ^= m;
            i += 1;
        }
        combine(sum, xor)
    }
}

/// Register offsets of the virtio-mmio transport (virtio 1.2, section 4.2.2,
/// "modern" version 2). All registers are 32 bits wide.
pub mod virtio_mmio {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;

    /// Value of MAGIC_VALUE ("virt").
    pub const MAGIC: u32 = 0x7472_6976;
    /// The transport version implemented.
    pub const TRANSPORT_VERSION: u32 = 2;
    /// VENDOR_ID of aivmm devices ("AIVM").
    pub const VENDOR: u32 = u32::from_le_bytes(*b"AIVM");

    /// Device status bits (virtio 1.2, section 2.1).
    pub const STATUS_ACKNOWLEDGE: u32 = 1;
    pub const STATUS_DRIVER: u32 = 2;
    pub const STATUS_DRIVER_OK: u32 = 4;
    pub const STATUS_FEATURES_OK: u32 = 8;
    pub const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
    pub const STATUS_FAILED: u32 = 128;

    /// Feature bit: the device conforms to virtio 1.x (mandatory for version 2).
    pub const F_VERSION_1: u32 = 32;
}

/// The console: a virtio console (device ID 3) without multiport or size
/// features. The guest writes log text to the transmit queue and notifies once
/// per flush; the VMM drains the queue while handling that notification, so the
/// buffer is free again when the notifying write returns.
pub mod console {
    /// virtio device ID of a console.
    pub const DEVICE_ID: u32 = 3;
    /// Index of the receive queue (host to guest; not used yet).
    pub const RECEIVE_QUEUE: u16 = 0;
    /// Index of the transmit queue (guest to host).
    pub const TRANSMIT_QUEUE: u16 = 1;
    /// Largest queue the device accepts.
    pub const QUEUE_MAX_SIZE: u16 = 64;
}

const _: () = {
    assert!(core::mem::size_of::<BootInfo>() == 136);
    assert!(core::mem::size_of::<BootInfo>() as u64 <= layout::PAGE_SIZE);
    assert!(core::mem::size_of::<FatalReport>() == 24);
    assert!(core::mem::size_of::<Report>() == 16);
    // The memory map's regions do not overlap.
    assert!(layout::PAGE_TABLES_END <= layout::KERNEL_LOAD_ADDR);
    assert!(layout::BOOT_INFO_ADDR + layout::PAGE_SIZE <= layout::PAGE_TABLES_ADDR);
    assert!(layout::RAM_MAX <= layout::MMIO_BASE);
    assert!(layout::MMIO_BASE + layout::MMIO_SIZE <= layout::MODEL_WINDOW_ADDR);
    assert!(
        layout::CONSOLE_MMIO_ADDR + layout::DEVICE_MMIO_SIZE
            <= layout::MMIO_BASE + layout::MMIO_SIZE
    );
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_checksum_of_small_inputs() {
        assert_eq!(selftest::reference(0), 0);
        let m0 = selftest::mix(selftest::element(0));
        let m1 = selftest::mix(selftest::element(1));
        assert_eq!(
            selftest::reference(2),
            selftest::combine(m0.wrapping_add(m1), m0 ^ m1)
        );
    }
}
