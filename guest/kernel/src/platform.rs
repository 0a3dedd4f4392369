//! Driver of the platform device (register layout in `aivmm_guest_abi::platform`).
//! Every access is a VM exit.

use aivmm_guest_abi::{layout, platform as reg, FatalReport, Report};
use core::fmt::Write;
use core::sync::atomic::{compiler_fence, AtomicU64, Ordering};

use crate::sync::SpinLock;

/// Where the registers are; the fixed layout address until the boot info is
/// validated (so that a bad boot info can still be reported).
static BASE: AtomicU64 = AtomicU64::new(layout::PLATFORM_MMIO_ADDR);

pub fn init(base: u64) {
    BASE.store(base, Ordering::Relaxed);
}

fn write(offset: u64, value: u64) {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: the platform registers are an MMIO page the VMM maps for the
    // guest; a store there is a request to the VMM, not a memory access.
    unsafe { core::ptr::write_volatile((base + offset) as *mut u64, value) }
}

/// Passes the address of `value` to a register whose argument is a structure
/// in guest memory. The VMM reads it during the exit, so it only has to live
/// until this returns.
fn write_address_of<T>(offset: u64, value: &T) {
    let address = (value as *const T).expose_provenance() as u64;
    // The structure must be in memory before the VMM looks at it.
    compiler_fence(Ordering::SeqCst);
    write(offset, address);
    compiler_fence(Ordering::SeqCst);
}

pub fn boot_complete() {
    write(reg::BOOT_COMPLETE, 1);
}

/// Ends the partition with `status`.
pub fn exit(status: u64) -> ! {
    write(reg::EXIT, status);
    // The VMM does not resume a vCPU after EXIT.
    loop {
        core::hint::spin_loop();
    }
}

/// Ends the partition with a fatal error the host reports as `code: message`.
pub fn fatal(code: u64, message: &str) -> ! {
    let report = FatalReport {
        code,
        message_addr: message.as_ptr() as u64,
        message_len: message.len() as u64,
    };
    write_address_of(reg::FATAL, &report);
    loop {
        core::hint::spin_loop();
    }
}

/// Room for one formatted fatal message; a second failure while formatting
/// (a panic inside a panic) falls back to a fixed message.
static FATAL_MESSAGE: SpinLock<MessageBuffer> = SpinLock::new(MessageBuffer {
    bytes: [0; 1024],
    len: 0,
});

struct MessageBuffer {
    bytes: [u8; 1024],
    len: usize,
}

impl Write for MessageBuffer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.bytes.len() - self.len;
        let take = s.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

pub fn fatal_fmt(code: u64, args: core::fmt::Arguments) -> ! {
    let Some(mut buffer) = FATAL_MESSAGE.try_lock() else {
        fatal(
            code,
            "a second fatal error happened while reporting the first one",
        )
    };
    buffer.len = 0;
    let _ = buffer.write_fmt(args);
    let message = match core::str::from_utf8(&buffer.bytes[..buffer.len]) {
        Ok(text) => text,
        // Truncation can split a character: keep the valid prefix.
        Err(error) => core::str::from_utf8(&buffer.bytes[..error.valid_up_to()]).unwrap_or(""),
    };
    fatal(code, message)
}

/// Blocks this vCPU until a wake is pending for it (see `platform::PARK`).
pub fn park() {
    write(reg::PARK, 0);
}

pub fn wake(vcpu: u32) {
    write(reg::WAKE, vcpu as u64);
}

pub fn report(key: u64, value: u64) {
    write_address_of(reg::REPORT, &Report { key, value });
}

pub fn ping() {
    write(reg::PING, 0);
}

pub fn ping_ioeventfd() {
    write(reg::PING_IOEVENTFD, 0);
}
