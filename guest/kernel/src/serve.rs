//! What the boot vCPU does in a partition with an inference device: warm the
//! memory up, load the model straight from the read-only window (no copy),
//! create the session, say READY, then serve requests until told to exit.
//!
//! Between requests vCPU 0 spins for a moment and then parks; the host wakes
//! it (and the workers) when it queues a request. While a request runs the
//! workers spin instead of parking ([`pool::set_active`]), and the guest
//! notifies the host once per generated token (the last token's notification
//! is the one of the end event).

use aivmm_engine::generate::{generate, Event, Flow, Request as GenerateRequest, StopReason};
use aivmm_engine::gguf::Gguf;
use aivmm_engine::model::{Model, Session, SessionLimits};
use aivmm_engine::quant::{Kernels, SimdLevel};
use aivmm_engine::sampling::SamplerConfig;
use aivmm_guest_abi::inference::{self as abi, EventHeader, ReadyInfo};
use aivmm_guest_abi::{fatal, BootInfo};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::inference::{InferenceDriver, Request};
use crate::pool::{self, VcpuPool};
use crate::{allocator, platform, println, time};

const PAGE: usize = 4096;
/// How long vCPU 0 polls for the next request before it parks (see
/// `pool::SPIN_AFTER_ACTIVE_MICROS` for why this long).
const IDLE_SPIN_MICROS: u64 = 20_000;
/// How long a request waits for the workers the host woke with it before
/// the pool wakes them itself (one exit each).
const WORKER_WAKE_WAIT_MICROS: u64 = 2000;

/// Ends the partition: the model cannot run here, for the engine's `reason`.
fn model_error(what: &str, reason: &dyn core::fmt::Display) -> ! {
    platform::fatal_fmt(fatal::MODEL, format_args!("{what}: {reason}"))
}

pub fn run(info: &'static BootInfo, entry_tsc: u64) -> ! {
    if info.model_addr == 0 || info.model_size == 0 {
        platform::fatal(
            fatal::MODEL,
            "the partition has an inference device but no model in the model window",
        );
    }
    // SAFETY: the VMM maps the model file read-only at model_addr, model_size
    // bytes (the window), for the whole life of the partition; nothing in the
    // guest can write it (a write ends the partition).
    let window: &'static [u8] = unsafe {
        core::slice::from_raw_parts(info.model_addr as *const u8, info.model_size as usize)
    };

    let start = time::rdtsc();
    warm_heap(info);
    let heap_warm = time::rdtsc();
    warm_window(window);
    let window_warm = time::rdtsc();

    let gguf = Gguf::parse(window).unwrap_or_else(|error| {
        model_error("the model window does not hold a usable GGUF file", &error)
    });
    let parsed = time::rdtsc();
    let model =
        Model::load(&gguf).unwrap_or_else(|error| model_error("cannot load the model", &error));
    let loaded = time::rdtsc();

    let workers = pool::n_workers();
    let mut limits = SessionLimits::for_model(&model.config, workers);
    if info.n_ctx != 0 {
        limits.n_ctx = info.n_ctx as usize;
    }
    if info.max_batch != 0 {
        limits.max_batch = info.max_batch as usize;
    }
    let session_bytes = Session::memory_required(&model, &limits);
    let kernels = Kernels::detect();
    let mut session = Session::new(&model, limits, kernels);
    let session_done = time::rdtsc();

    let mut device =
        InferenceDriver::init(info.inference_mmio, abi::request_buffer_bytes(limits.n_ctx));
    let heap = allocator::stats();
    println!(
        "model {:?} ({}): {} tokens of context, {} KiB of session, {} vCPU(s) with {:?}; heap {} of {} MiB in use",
        model.name,
        model.config.arch.name(),
        limits.n_ctx,
        session_bytes >> 10,
        workers,
        kernels.level(),
        heap.in_use >> 20,
        heap.size >> 20
    );
    let ready = ReadyInfo {
        entry_tsc,
        ready_tsc: time::rdtsc(),
        warmup_heap_ticks: heap_warm - start,
        warmup_window_ticks: window_warm - heap_warm,
        parse_ticks: parsed - window_warm,
        load_ticks: loaded - parsed,
        session_ticks: session_done - loaded,
        session_bytes: session_bytes as u64,
        heap_bytes: heap.size as u64,
        heap_used_bytes: heap.in_use as u64,
        heap_peak_bytes: heap.peak as u64,
        n_ctx: limits.n_ctx as u64,
        max_batch: limits.max_batch as u64,
        n_vocab: model.config.n_vocab as u64,
        simd_level: simd_code(kernels.level()),
        workers: workers as u64,
        request_buffer_bytes: device.request_buffer_len() as u64,
    };
    device.push_event(
        EventHeader {
            kind: abi::EVENT_READY,
            tsc: ready.ready_tsc,
            ..EventHeader::default()
        },
        &ready.to_bytes(),
    );
    device.notify();

    // A request that arrived while a generation ran (an EXIT), taken next.
    let mut deferred = None;
    loop {
        let request = match deferred.take() {
            Some(request) => request,
            None => wait_for_request(&mut device),
        };
        match request.header.kind {
            abi::REQUEST_GENERATE => {
                deferred = serve(&mut device, &model, &mut session, &request)
            }
            // The request it names has already ended.
            abi::REQUEST_CANCEL => {}
            abi::REQUEST_EXIT => {
                crate::console::flush();
                platform::exit(0)
            }
            other => {
                let message = format!("unknown request kind {other}");
                send_error(
                    &mut device,
                    request.header.request_id,
                    abi::ERROR_BAD_REQUEST,
                    &message,
                );
            }
        }
    }
}

fn simd_code(level: SimdLevel) -> u64 {
    match level {
        SimdLevel::Scalar => 0,
        SimdLevel::Avx2 => 1,
        SimdLevel::Avx512 => 2,
        SimdLevel::Avx512Vnni => 3,
    }
}

/// Polls for a request, then parks until the host wakes this vCPU.
fn wait_for_request(device: &mut InferenceDriver) -> Request {
    loop {
        let deadline = time::rdtsc() + time::ticks_from_micros(IDLE_SPIN_MICROS);
        while time::rdtsc() < deadline {
            if let Some(request) = device.poll_request() {
                return request;
            }
            core::hint::spin_loop();
        }
        // A wake that came after the last poll is pending: PARK returns at once.
        platform::park();
    }
}

/// Splits `[start, end)` into page-aligned parts, one per worker, and runs
/// `touch(page address)` on every page on every vCPU at once: first touches
/// cost ~10 µs each under nested paging, and vCPUs take them in parallel.
fn touch_pages_in_parallel(start: usize, end: usize, touch: &(dyn Fn(usize) + Sync)) {
    let first = start.next_multiple_of(PAGE);
    let pages = end.saturating_sub(first) / PAGE;
    let per_worker = pages.div_ceil(pool::n_workers());
    pool::run(&|worker| {
        let from = (worker * per_worker).min(pages);
        let to = ((worker + 1) * per_worker).min(pages);
        for page in from..to {
            touch(first + page * PAGE);
        }
    });
}

/// Touches the first `warmup_heap_bytes` of the heap (where the allocator
/// places the tokenizer and the session): a write per page, so that the pages
/// are mapped writable before the engine needs them.
fn warm_heap(info: &BootInfo) {
    let start = info.heap_start as usize;
    let end = (info.heap_start.saturating_add(info.warmup_heap_bytes)).min(info.heap_end) as usize;
    touch_pages_in_parallel(start, end, &|page| {
        // SAFETY: `page` is a page-aligned address inside the heap, mapped
        // read-write. `lock or [page], 0` is one atomic read-modify-write that
        // leaves the byte as it was (allocator bookkeeping may live there), so
        // it cannot lose a concurrent write; as a write it faults the page in
        // writable at once (a read first would fault twice: once for a
        // read-only mapping, once for the write). An atomic OR with 0 written
        // in Rust may be compiled to a fenced load, hence the assembly.
        unsafe {
            core::arch::asm!("lock or byte ptr [{page}], 0", page = in(reg) page, options(nostack));
        }
    });
}

/// Reads one byte of every page of the model window.
fn warm_window(window: &[u8]) {
    let start = window.as_ptr() as usize;
    touch_pages_in_parallel(start, start + window.len(), &|page| {
        // SAFETY: `page` is a page-aligned address inside the window slice.
        unsafe { core::ptr::read_volatile(page as *const u8) };
    })
}

fn send_error(device: &mut InferenceDriver, request_id: u64, code: u64, message: &str) {
    let mut values = [0; 5];
    values[abi::ERROR_CODE] = code;
    device.push_text_event(
        EventHeader {
            kind: abi::EVENT_ERROR,
            request_id,
            tsc: time::rdtsc(),
            values,
            ..EventHeader::default()
        },
        message,
    );
    device.notify();
}

/// The context of a request: token ids, or text tokenized here.
fn context_tokens(model: &Model<'_>, request: &Request) -> Result<Vec<u32>, String> {
    if request.header.flags & abi::FLAG_PROMPT_IS_TEXT != 0 {
        let text = core::str::from_utf8(&request.payload)
            .map_err(|error| format!("the prompt text is not UTF-8: {error}"))?;
        return Ok(model.tokenizer.encode(text, true, true));
    }
    if !request.payload.len().is_multiple_of(4) {
        return Err(format!(
            "the prompt is {} bytes, not a whole number of 32-bit token ids",
            request.payload.len()
        ));
    }
    Ok(request
        .payload
        .chunks_exact(4)
        .map(|id| u32::from_le_bytes([id[0], id[1], id[2], id[3]]))
        .collect())
}

fn stop_code(stop: StopReason) -> u64 {
    match stop {
        StopReason::EndOfGeneration => abi::STOP_END_OF_GENERATION,
        StopReason::MaxTokens => abi::STOP_MAX_TOKENS,
        StopReason::ContextFull => abi::STOP_CONTEXT_FULL,
        StopReason::Cancelled => abi::STOP_CANCELLED,
    }
}

/// Runs one generation request. Returns a request that arrived while it ran
/// and must be handled next (a cancel of this one is consumed here).
fn serve(
    device: &mut InferenceDriver,
    model: &Model<'_>,
    session: &mut Session,
    request: &Request,
) -> Option<Request> {
    let received = time::rdtsc();
    let header = request.header;
    let id = header.request_id;
    let sampling = SamplerConfig {
        temperature: header.temperature,
        top_k: header.top_k as usize,
        top_p: header.top_p,
        min_p: header.min_p,
        repeat_penalty: header.repeat_penalty,
        repeat_last_n: header.repeat_last_n as usize,
        seed: header.seed,
    };
    if let Err(why) = sampling.validate() {
        send_error(
            device,
            id,
            abi::ERROR_BAD_REQUEST,
            &format!("invalid sampling parameters: {why}"),
        );
        return None;
    }
    let context = match context_tokens(model, request) {
        Ok(tokens) if tokens.is_empty() => {
            send_error(device, id, abi::ERROR_BAD_REQUEST, "the prompt is empty");
            return None;
        }
        Ok(tokens) => tokens,
        Err(message) => {
            send_error(device, id, abi::ERROR_BAD_REQUEST, &message);
            return None;
        }
    };
    let tokenized = time::rdtsc();
    let stop_at_eog = header.flags & abi::FLAG_STOP_AT_EOG != 0;
    let max_tokens = header.max_tokens as usize;
    let n_ctx = session.limits().n_ctx;
    let n_context = context.len();
    if n_context > n_ctx {
        send_error(
            device,
            id,
            abi::ERROR_BAD_REQUEST,
            &format!(
                "the prompt is {n_context} tokens and the partition's context holds {n_ctx}: \
                 shorten the prompt or give the partition a longer context"
            ),
        );
        return None;
    }
    let generate_request = GenerateRequest {
        prompt: &context,
        max_tokens,
        sampling,
        stop_at_eog,
    };
    let mut produced = 0usize;
    let mut arrived = None;
    let notifications_before = device.notifications();
    pool::set_active(true, WORKER_WAKE_WAIT_MICROS);
    let result = generate(model, session, &VcpuPool, &generate_request, &mut |event| {
        match event {
            Event::PromptProcessed { n_fed, n_reused } => {
                let mut values = [0; 5];
                values[abi::PROMPT_N_CONTEXT] = n_context as u64;
                values[abi::PROMPT_N_FED] = n_fed as u64;
                values[abi::PROMPT_N_REUSED] = n_reused as u64;
                values[abi::PROMPT_RECEIVED_TSC] = received;
                values[abi::PROMPT_TOKENIZED_TSC] = tokenized;
                // Delivered with the first token's notification.
                device.push_event(
                    EventHeader {
                        kind: abi::EVENT_PROMPT_PROCESSED,
                        request_id: id,
                        tsc: time::rdtsc(),
                        values,
                        ..EventHeader::default()
                    },
                    &[],
                );
            }
            Event::Token { id: token, text } => {
                let tsc = time::rdtsc();
                produced += 1;
                let mut values = [0; 5];
                values[abi::TOKEN_ID] = token as u64;
                device.push_text_event(
                    EventHeader {
                        kind: abi::EVENT_TOKEN,
                        request_id: id,
                        tsc,
                        values,
                        ..EventHeader::default()
                    },
                    text,
                );
                // The same tests generate() makes after this event: when this
                // is the last token, the end event's notification carries it.
                let last = (stop_at_eog && model.tokenizer.is_end_of_generation(token))
                    || produced >= max_tokens
                    || n_context + produced > n_ctx;
                if last {
                    return Flow::Continue;
                }
                device.notify();
                // The host sends one generation at a time, so what arrives
                // now is a cancel (of this request, or a stale one of an
                // ended request) or an exit, which ends this request first.
                if let Some(next) = device.poll_request() {
                    match next.header.kind {
                        abi::REQUEST_CANCEL if next.header.request_id != id => {}
                        abi::REQUEST_CANCEL => return Flow::Stop,
                        _ => {
                            arrived = Some(next);
                            return Flow::Stop;
                        }
                    }
                }
            }
            Event::Tail { text } => device.push_text_event(
                EventHeader {
                    kind: abi::EVENT_TEXT,
                    request_id: id,
                    tsc: time::rdtsc(),
                    ..EventHeader::default()
                },
                text,
            ),
        }
        Flow::Continue
    });
    match result {
        Ok(outcome) => {
            let mut values = [0; 5];
            values[abi::END_STOP_REASON] = stop_code(outcome.stop);
            values[abi::END_TOKENS] = outcome.tokens.len() as u64;
            values[abi::END_HEAP_PEAK] = allocator::stats().peak as u64;
            // The notification below is this request's last.
            values[abi::END_NOTIFICATIONS] = device.notifications() - notifications_before + 1;
            device.push_event(
                EventHeader {
                    kind: abi::EVENT_END,
                    request_id: id,
                    tsc: time::rdtsc(),
                    values,
                    ..EventHeader::default()
                },
                &[],
            );
            device.notify();
        }
        Err(error) => send_error(device, id, abi::ERROR_ENGINE, &format!("{error}")),
    }
    pool::set_active(false, 0);
    arrived
}
