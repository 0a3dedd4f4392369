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
//! - a virtio-mmio inference device ([`inference`]): requests in, tokens out,
//! - the read-only model window ([`layout::MODEL_WINDOW_ADDR`]).
//!
//! All structures are `#[repr(C)]`, little-endian, and only grow at the end
//! (a change in meaning bumps [`ABI_VERSION`]).
#![no_std]

/// Version of this contract; the guest refuses a [`BootInfo`] with another one.
pub const ABI_VERSION: u32 = 2;

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
    /// The virtio-mmio inference device ([`crate::inference`]), one page.
    pub const INFERENCE_MMIO_ADDR: u64 = MMIO_BASE + 0x2000;
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
    /// Guest-physical address of the virtio-mmio inference device (0 = none:
    /// the kernel runs the requests above and exits). With a device, the
    /// kernel loads the model in the window and serves requests until told
    /// to exit (see [`inference`]).
    pub inference_mmio: u64,
    /// Context length (positions of the KV cache) of the inference session.
    pub n_ctx: u32,
    /// Tokens per forward pass when a prompt is processed.
    pub max_batch: u32,
    /// Bytes at the start of the heap to touch before the model is loaded:
    /// the working memory's share of the warm-up (0 = none).
    pub warmup_heap_bytes: u64,
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
    /// The model in the window cannot run (not a GGUF file, unsupported
    /// architecture or tensor type, ...); the message is the engine's.
    pub const MODEL: u64 = 5;
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

/// The inference device: a virtio-mmio device (version 2, no features beyond
/// `VIRTIO_F_VERSION_1`) with two split queues, polled by the guest.
///
/// - **Request queue** ([`REQUEST_QUEUE`], host to guest): the guest keeps a
///   device-writable buffer available; the host writes one request into it
///   (a [`RequestHeader`] followed by `payload_len` bytes of prompt) and puts
///   it in the used ring, then wakes vCPU 0 (which parks when idle). The guest
///   never notifies this queue.
/// - **Event queue** ([`EVENT_QUEUE`], guest to host): the guest writes events
///   (an [`EventHeader`] followed by `payload_len` bytes) into device-readable
///   buffers of [`EVENT_SLOT_BYTES`] and notifies with one QUEUE_NOTIFY write
///   **at most once per generated token**. The VMM completes that write in
///   the kernel (ioeventfd) and a host thread drains the queue.
///
/// All integers are little-endian; the structures are `#[repr(C)]` and are
/// (de)serialized field by field with `to_bytes` / `from_bytes`.
pub mod inference {
    /// virtio device ID of the inference device. Outside the range OASIS
    /// assigns (1..=63 so far); [`crate::virtio_mmio::VENDOR`] says it is ours.
    pub const DEVICE_ID: u32 = 0xA1A1;
    /// Index of the request queue (host to guest).
    pub const REQUEST_QUEUE: u16 = 0;
    /// Index of the event queue (guest to host).
    pub const EVENT_QUEUE: u16 = 1;
    /// Largest request queue the device accepts.
    pub const REQUEST_QUEUE_MAX_SIZE: u16 = 4;
    /// Largest event queue the device accepts.
    pub const EVENT_QUEUE_MAX_SIZE: u16 = 64;
    /// Size of one event buffer: a header and up to
    /// `EVENT_SLOT_BYTES - EVENT_HEADER_BYTES` bytes of payload. Longer text
    /// continues in [`EVENT_TEXT`] events.
    pub const EVENT_SLOT_BYTES: usize = 4096;
    pub const REQUEST_HEADER_BYTES: usize = 64;

    /// Size of the guest's request buffer for a context of `n_ctx` tokens:
    /// room for every token id, or for about 16 bytes of text per token, and
    /// at least 64 KiB. The host sizes guest memory with it.
    pub const fn request_buffer_bytes(n_ctx: usize) -> usize {
        let payload = if n_ctx * 16 > 64 << 10 {
            n_ctx * 16
        } else {
            64 << 10
        };
        (REQUEST_HEADER_BYTES + payload).next_multiple_of(4096)
    }
    pub const EVENT_HEADER_BYTES: usize = 64;
    pub const READY_INFO_BYTES: usize = 136;

    /// [`RequestHeader::kind`]: generate after the prompt in the payload.
    pub const REQUEST_GENERATE: u32 = 1;
    /// [`RequestHeader::kind`]: end the partition (the guest writes EXIT 0).
    /// Sent while a generation runs, it ends that generation first (its end
    /// event says [`STOP_CANCELLED`]).
    pub const REQUEST_EXIT: u32 = 2;
    /// [`RequestHeader::kind`]: stop the generation of `request_id` (the
    /// client went away). The guest polls for it after every token (a memory
    /// read, no exit) and ends that request with [`STOP_CANCELLED`]; a cancel
    /// for a request that is not running is ignored.
    pub const REQUEST_CANCEL: u32 = 3;

    /// [`RequestHeader::flags`]: stop at end-of-generation tokens (EOS,
    /// `<end_of_turn>`, ...); without it, generate `max_tokens` (benchmarks).
    pub const FLAG_STOP_AT_EOG: u32 = 1 << 0;
    /// [`RequestHeader::flags`]: the payload is UTF-8 text, tokenized in the
    /// guest like a llama.cpp prompt (BOS per the model, special tokens such
    /// as `<start_of_turn>` recognised). Without it, the payload is the
    /// context as little-endian u32 token ids.
    pub const FLAG_PROMPT_IS_TEXT: u32 = 1 << 1;

    /// One request, at the start of a request buffer.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    pub struct RequestHeader {
        /// [`REQUEST_GENERATE`], [`REQUEST_EXIT`] or [`REQUEST_CANCEL`].
        pub kind: u32,
        /// `FLAG_*` bits.
        pub flags: u32,
        /// Chosen by the host; every event of this request carries it.
        pub request_id: u64,
        /// Most tokens to generate.
        pub max_tokens: u32,
        /// Bytes of prompt after the header (token ids or text, see flags).
        /// The whole context goes in every request: the guest's session
        /// reuses the longest prefix it already holds (a chat turn costs only
        /// its new tokens).
        pub payload_len: u32,
        /// Sampling (see the engine's `SamplerConfig`); temperature 0 is greedy.
        pub temperature: f32,
        pub top_k: u32,
        pub top_p: f32,
        pub min_p: f32,
        pub repeat_penalty: f32,
        pub repeat_last_n: u32,
        pub seed: u64,
        pub reserved: u64,
    }

    impl RequestHeader {
        pub fn to_bytes(&self) -> [u8; REQUEST_HEADER_BYTES] {
            let mut out = [0u8; REQUEST_HEADER_BYTES];
            let mut w = Writer::new(&mut out);
            w.u32(self.kind);
            w.u32(self.flags);
            w.u64(self.request_id);
            w.u32(self.max_tokens);
            w.u32(self.payload_len);
            w.u32(self.temperature.to_bits());
            w.u32(self.top_k);
            w.u32(self.top_p.to_bits());
            w.u32(self.min_p.to_bits());
            w.u32(self.repeat_penalty.to_bits());
            w.u32(self.repeat_last_n);
            w.u64(self.seed);
            w.u64(self.reserved);
            out
        }

        pub fn from_bytes(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Self {
            let mut r = Reader::new(bytes);
            RequestHeader {
                kind: r.u32(),
                flags: r.u32(),
                request_id: r.u64(),
                max_tokens: r.u32(),
                payload_len: r.u32(),
                temperature: f32::from_bits(r.u32()),
                top_k: r.u32(),
                top_p: f32::from_bits(r.u32()),
                min_p: f32::from_bits(r.u32()),
                repeat_penalty: f32::from_bits(r.u32()),
                repeat_last_n: r.u32(),
                seed: r.u64(),
                reserved: r.u64(),
            }
        }
    }

    /// [`EventHeader::kind`]: the model is loaded and warm; payload: [`ReadyInfo`].
    pub const EVENT_READY: u32 = 1;
    /// The prompt was fed; `values`: [`PROMPT_N_CONTEXT`], [`PROMPT_N_FED`],
    /// [`PROMPT_N_REUSED`], [`PROMPT_RECEIVED_TSC`], [`PROMPT_TOKENIZED_TSC`];
    /// `tsc` is when feeding ended.
    pub const EVENT_PROMPT_PROCESSED: u32 = 2;
    /// A generated token: `values[`[`TOKEN_ID`]`]`; payload: the text it
    /// completes (may be empty); `tsc` is when it was sampled.
    pub const EVENT_TOKEN: u32 = 3;
    /// More text of the request (the rest of a long token text, or the tail
    /// held back at the end of generation).
    pub const EVENT_TEXT: u32 = 4;
    /// Generation ended: `values`: [`END_STOP_REASON`] (`STOP_*`),
    /// [`END_TOKENS`], [`END_HEAP_PEAK`], [`END_NOTIFICATIONS`]; no more
    /// events for this request.
    pub const EVENT_END: u32 = 5;
    /// The request failed: `values[`[`ERROR_CODE`]`]` (`ERROR_*`); payload:
    /// the message. No more events for this request; the guest goes on serving.
    pub const EVENT_ERROR: u32 = 6;

    pub const PROMPT_N_CONTEXT: usize = 0;
    pub const PROMPT_N_FED: usize = 1;
    pub const PROMPT_N_REUSED: usize = 2;
    pub const PROMPT_RECEIVED_TSC: usize = 3;
    pub const PROMPT_TOKENIZED_TSC: usize = 4;
    pub const TOKEN_ID: usize = 0;
    pub const END_STOP_REASON: usize = 0;
    pub const END_TOKENS: usize = 1;
    /// The most heap bytes the guest has had in use so far.
    pub const END_HEAP_PEAK: usize = 2;
    /// Event-queue notifications the guest made for this request, the one
    /// that follows this event included (the host cannot tell exactly which
    /// of the notifications it counts belong to a request: a drain can
    /// overtake the notification of what it drains).
    pub const END_NOTIFICATIONS: usize = 3;
    pub const ERROR_CODE: usize = 0;

    /// Stop reasons (the engine's `StopReason`).
    pub const STOP_END_OF_GENERATION: u64 = 1;
    pub const STOP_MAX_TOKENS: u64 = 2;
    pub const STOP_CONTEXT_FULL: u64 = 3;
    pub const STOP_CANCELLED: u64 = 4;

    /// The request itself is invalid (unknown kind, bad sampling values,
    /// token ids that are not u32s, text that is not UTF-8, empty prompt).
    pub const ERROR_BAD_REQUEST: u64 = 1;
    /// The engine refused or failed (the context does not fit, ...).
    pub const ERROR_ENGINE: u64 = 2;

    /// The header of every event.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct EventHeader {
        /// One of the `EVENT_*` kinds.
        pub kind: u32,
        /// Bytes after the header in the same buffer.
        pub payload_len: u32,
        /// The request this event belongs to (0 for [`EVENT_READY`]).
        pub request_id: u64,
        /// Guest TSC when the event happened ([`crate::BootInfo::tsc_khz`]).
        pub tsc: u64,
        /// Meaning depends on `kind` (see the `EVENT_*` constants).
        pub values: [u64; 5],
    }

    impl EventHeader {
        pub fn to_bytes(&self) -> [u8; EVENT_HEADER_BYTES] {
            let mut out = [0u8; EVENT_HEADER_BYTES];
            let mut w = Writer::new(&mut out);
            w.u32(self.kind);
            w.u32(self.payload_len);
            w.u64(self.request_id);
            w.u64(self.tsc);
            for value in self.values {
                w.u64(value);
            }
            out
        }

        pub fn from_bytes(bytes: &[u8; EVENT_HEADER_BYTES]) -> Self {
            let mut r = Reader::new(bytes);
            EventHeader {
                kind: r.u32(),
                payload_len: r.u32(),
                request_id: r.u64(),
                tsc: r.u64(),
                values: [r.u64(), r.u64(), r.u64(), r.u64(), r.u64()],
            }
        }
    }

    /// The payload of [`EVENT_READY`]: how the guest got ready (TSC ticks) and
    /// what it holds.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct ReadyInfo {
        /// TSC at the boot vCPU's entry.
        pub entry_tsc: u64,
        /// TSC when the ready event was written.
        pub ready_tsc: u64,
        /// Ticks to touch the first `warmup_heap_bytes` of the heap.
        pub warmup_heap_ticks: u64,
        /// Ticks to touch every page of the model window.
        pub warmup_window_ticks: u64,
        /// Ticks of `Gguf::parse` over the window.
        pub parse_ticks: u64,
        /// Ticks of `Model::load` (config, weights, tokenizer).
        pub load_ticks: u64,
        /// Ticks of `Session::new`: it zero-fills the session's memory, so
        /// this is the session's share of the warm-up.
        pub session_ticks: u64,
        /// Bytes the session allocated (`Session::memory_required`).
        pub session_bytes: u64,
        /// Heap size, bytes in use after loading, and the peak so far.
        pub heap_bytes: u64,
        pub heap_used_bytes: u64,
        pub heap_peak_bytes: u64,
        /// The session's context length and batch.
        pub n_ctx: u64,
        pub max_batch: u64,
        /// Vocabulary size of the model.
        pub n_vocab: u64,
        /// SIMD level of the engine's kernels: 0 scalar, 1 AVX2, 2 AVX-512,
        /// 3 AVX-512 VNNI.
        pub simd_level: u64,
        /// Number of workers (vCPUs) the engine splits work over.
        pub workers: u64,
        /// Bytes of the guest's request buffer (the largest request payload
        /// is this minus [`REQUEST_HEADER_BYTES`]).
        pub request_buffer_bytes: u64,
    }

    impl ReadyInfo {
        fn fields(&self) -> [u64; READY_INFO_BYTES / 8] {
            [
                self.entry_tsc,
                self.ready_tsc,
                self.warmup_heap_ticks,
                self.warmup_window_ticks,
                self.parse_ticks,
                self.load_ticks,
                self.session_ticks,
                self.session_bytes,
                self.heap_bytes,
                self.heap_used_bytes,
                self.heap_peak_bytes,
                self.n_ctx,
                self.max_batch,
                self.n_vocab,
                self.simd_level,
                self.workers,
                self.request_buffer_bytes,
            ]
        }

        pub fn to_bytes(&self) -> [u8; READY_INFO_BYTES] {
            let mut out = [0u8; READY_INFO_BYTES];
            let mut w = Writer::new(&mut out);
            for value in self.fields() {
                w.u64(value);
            }
            out
        }

        pub fn from_bytes(bytes: &[u8; READY_INFO_BYTES]) -> Self {
            let mut r = Reader::new(bytes);
            ReadyInfo {
                entry_tsc: r.u64(),
                ready_tsc: r.u64(),
                warmup_heap_ticks: r.u64(),
                warmup_window_ticks: r.u64(),
                parse_ticks: r.u64(),
                load_ticks: r.u64(),
                session_ticks: r.u64(),
                session_bytes: r.u64(),
                heap_bytes: r.u64(),
                heap_used_bytes: r.u64(),
                heap_peak_bytes: r.u64(),
                n_ctx: r.u64(),
                max_batch: r.u64(),
                n_vocab: r.u64(),
                simd_level: r.u64(),
                workers: r.u64(),
                request_buffer_bytes: r.u64(),
            }
        }
    }

    /// Little-endian writer over a fixed buffer (the sizes are checked at
    /// compile time against the structures).
    struct Writer<'a> {
        out: &'a mut [u8],
        at: usize,
    }

    impl<'a> Writer<'a> {
        fn new(out: &'a mut [u8]) -> Self {
            Writer { out, at: 0 }
        }
        fn u32(&mut self, value: u32) {
            self.out[self.at..self.at + 4].copy_from_slice(&value.to_le_bytes());
            self.at += 4;
        }
        fn u64(&mut self, value: u64) {
            self.out[self.at..self.at + 8].copy_from_slice(&value.to_le_bytes());
            self.at += 8;
        }
    }

    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl<'a> Reader<'a> {
        fn new(bytes: &'a [u8]) -> Self {
            Reader { bytes, at: 0 }
        }
        fn u32(&mut self) -> u32 {
            let mut word = [0u8; 4];
            word.copy_from_slice(&self.bytes[self.at..self.at + 4]);
            self.at += 4;
            u32::from_le_bytes(word)
        }
        fn u64(&mut self) -> u64 {
            let mut word = [0u8; 8];
            word.copy_from_slice(&self.bytes[self.at..self.at + 8]);
            self.at += 8;
            u64::from_le_bytes(word)
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<BootInfo>() == 160);
    assert!(core::mem::size_of::<BootInfo>() as u64 <= layout::PAGE_SIZE);
    assert!(core::mem::size_of::<FatalReport>() == 24);
    assert!(core::mem::size_of::<Report>() == 16);
    // The memory map's regions do not overlap.
    assert!(layout::PAGE_TABLES_END <= layout::KERNEL_LOAD_ADDR);
    assert!(layout::BOOT_INFO_ADDR + layout::PAGE_SIZE <= layout::PAGE_TABLES_ADDR);
    assert!(layout::RAM_MAX <= layout::MMIO_BASE);
    assert!(layout::MMIO_BASE + layout::MMIO_SIZE <= layout::MODEL_WINDOW_ADDR);
    assert!(layout::CONSOLE_MMIO_ADDR + layout::DEVICE_MMIO_SIZE <= layout::INFERENCE_MMIO_ADDR);
    assert!(
        layout::INFERENCE_MMIO_ADDR + layout::DEVICE_MMIO_SIZE
            <= layout::MMIO_BASE + layout::MMIO_SIZE
    );
    assert!(inference::REQUEST_HEADER_BYTES == core::mem::size_of::<inference::RequestHeader>());
    assert!(inference::EVENT_HEADER_BYTES == core::mem::size_of::<inference::EventHeader>());
    assert!(inference::READY_INFO_BYTES == core::mem::size_of::<inference::ReadyInfo>());
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_structures_round_trip() {
        let request = inference::RequestHeader {
            kind: inference::REQUEST_GENERATE,
            flags: inference::FLAG_STOP_AT_EOG | inference::FLAG_PROMPT_IS_TEXT,
            request_id: 0x1122_3344_5566_7788,
            max_tokens: 32,
            payload_len: 1000,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 0x5eed,
            reserved: 0,
        };
        let bytes = request.to_bytes();
        assert_eq!(bytes[8..16], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(inference::RequestHeader::from_bytes(&bytes), request);

        let event = inference::EventHeader {
            kind: inference::EVENT_TOKEN,
            payload_len: 5,
            request_id: 7,
            tsc: 123_456,
            values: [1, 2, 3, 4, 5],
        };
        assert_eq!(inference::EventHeader::from_bytes(&event.to_bytes()), event);

        let ready = inference::ReadyInfo {
            entry_tsc: 1,
            request_buffer_bytes: 17,
            heap_peak_bytes: 11,
            ..Default::default()
        };
        let bytes = ready.to_bytes();
        assert_eq!(bytes[128..136], 17u64.to_le_bytes());
        assert_eq!(inference::ReadyInfo::from_bytes(&bytes), ready);
    }

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
