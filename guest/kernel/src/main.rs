//! The aivmm inference kernel: a freestanding guest that runs at CPL3 in a
//! KVM partition prepared entirely by the VMM (see `docs/guest-abi.md`).
//!
//! Every vCPU enters at [`_start`] with the boot-info address and its own
//! index. vCPU 0 runs [`boot_main`]: it sets up the heap and the console,
//! reports boot complete and then does the partition's work: the self-tests
//! and benchmarks the boot info asks for and, when the partition has an
//! inference device, loading the model and serving requests ([`serve`]); every other vCPU
//! runs [`pool::worker_main`], waiting (spin, then park) for jobs that vCPU 0
//! hands out through [`pool::run`].
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

mod allocator;
mod console;
mod inference;
mod mem;
mod platform;
mod pool;
mod selftest;
mod serve;
mod sync;
mod time;
mod virtio_mmio;

use aivmm_guest_abi::{debug, fatal, BootInfo, ABI_VERSION, BOOT_INFO_MAGIC};
use core::sync::atomic::{AtomicPtr, Ordering};

static BOOT_INFO: AtomicPtr<BootInfo> = AtomicPtr::new(core::ptr::null_mut());

/// The boot info every vCPU was started with.
pub fn boot_info() -> &'static BootInfo {
    let ptr = BOOT_INFO.load(Ordering::Relaxed);
    // SAFETY: `_start` stores the address the VMM passed in RDI before anything
    // calls this; the VMM keeps that page mapped (read-only) and unchanged for
    // the whole life of the partition.
    unsafe { &*ptr }
}

/// The entry point of every vCPU (System V calling convention: RDI, RSI).
#[unsafe(no_mangle)]
pub extern "C" fn _start(boot_info: *const BootInfo, vcpu_index: u64) -> ! {
    let entry_tsc = time::rdtsc();
    BOOT_INFO.store(boot_info.cast_mut(), Ordering::Relaxed);
    let info = self::boot_info();
    if info.magic != BOOT_INFO_MAGIC || info.abi_version != ABI_VERSION {
        platform::fatal(
            fatal::BAD_BOOT_INFO,
            "boot info magic or ABI version does not match this kernel",
        );
    }
    platform::init(info.platform_mmio);
    time::init(info.tsc_khz);
    let vcpu = vcpu_index as u32;
    if vcpu == 0 {
        boot_main(info, entry_tsc)
    } else {
        pool::worker_main(vcpu)
    }
}

fn boot_main(info: &'static BootInfo, entry_tsc: u64) -> ! {
    allocator::init(info.heap_start, info.heap_end);
    console::init(info.console_mmio);
    println!(
        "aivmm inference kernel: {} vCPU(s), {} MiB RAM, {} MiB heap, TSC {} kHz, model window {} bytes",
        info.vcpu_count,
        info.ram_size >> 20,
        (info.heap_end - info.heap_start) >> 20,
        info.tsc_khz,
        info.model_size
    );
    platform::report(aivmm_guest_abi::report::BOOT_TSC, time::rdtsc() - entry_tsc);
    platform::boot_complete();

    if info.model_size >= 8 {
        // SAFETY: the VMM maps the model window read-only at model_addr with at
        // least model_size bytes; reading it is what the window is for.
        let head = unsafe { core::ptr::read_volatile(info.model_addr as *const u64) };
        platform::report(aivmm_guest_abi::report::MODEL_FIRST_BYTES, head);
    }
    if info.debug_flags != 0 {
        // Every vCPU looks at the requests, so that a worker can be the one to fail.
        pool::run(&|worker| run_debug_requests(info, worker as u32));
    }
    if info.bench_mmio_exits > 0 {
        selftest::bench_mmio_exits(info.bench_mmio_exits);
    }
    if info.bench_touch_bytes > 0 {
        selftest::bench_first_touch(info.bench_touch_bytes);
    }
    if info.selftest_elements > 0 {
        selftest::checksum(info.selftest_elements);
    }
    if info.inference_mmio != 0 {
        serve::run(info, entry_tsc)
    }
    console::flush();
    platform::exit(0)
}

/// Carries out the deliberate failures a test asked for, on the vCPU it named.
/// Never inlined, so that fault reports name it.
#[inline(never)]
fn run_debug_requests(info: &BootInfo, vcpu: u32) {
    if info.debug_flags == 0 || info.debug_vcpu != vcpu {
        return;
    }
    if info.debug_flags & debug::PANIC != 0 {
        panic!(
            "deliberate panic requested by the boot info (debug flags {:#x})",
            info.debug_flags
        );
    }
    if info.debug_flags & debug::WRITE_MODEL_WINDOW != 0 {
        // SAFETY: deliberately invalid: the model window is read-only, and the
        // VMM must turn this store into a reported guest fault.
        unsafe { core::ptr::write_volatile(info.model_addr as *mut u64, 0x5752_4954_4520_4d45) };
    }
    if info.debug_flags & debug::HANG != 0 {
        loop {
            core::hint::spin_loop();
        }
    }
    if info.debug_flags & debug::FAULT_NOW != 0 {
        // SAFETY: deliberately invalid: the first page is never mapped, so this
        // store page-faults; with an empty IDT that is a triple fault the VMM
        // must report with this vCPU's RIP.
        unsafe {
            core::arch::asm!("mov qword ptr [{addr}], {val}", addr = in(reg) debug::FAULT_ADDRESS, val = in(reg) 0xdeadu64)
        };
    }
}

/// The precompiled `alloc` library is built for unwinding, so its cleanup
/// paths name this symbol. Nothing unwinds here (the panic handler reports
/// and stops), so it is never reached; it exists for the linker.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    platform::fatal(
        fatal::PANIC,
        "_Unwind_Resume reached, but the kernel never unwinds",
    )
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::flush_if_unlocked();
    platform::fatal_fmt(fatal::PANIC, format_args!("{info}"))
}
