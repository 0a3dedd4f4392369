//! Inference in a partition, from the host's side: size the partition for a
//! model ([`plan_memory`]), boot it and wait until the guest has the model
//! loaded and warm ([`InferencePartition::start`]), run completions through
//! the inference device ([`InferencePartition::generate`]) and end it.
//!
//! The guest does the tokenizing, the forward passes and the sampling; the
//! host only sends the context (text or token ids) and receives tokens with
//! their text and guest TSC timestamps, from which it computes the same
//! timings `aivmm generate --host` reports.

use std::time::{Duration, Instant};

use aivmm_devices::virtio::inference::InferenceEvent;
use aivmm_engine::generate::{Flow, StopReason};
use aivmm_engine::model::{Model, Session, SessionLimits};
use aivmm_engine::sampling::SamplerConfig;
use aivmm_guest_abi::fatal;
use aivmm_guest_abi::inference::{self as abi, ReadyInfo, RequestHeader};
use aivmm_guest_abi::layout::{LARGE_PAGE_SIZE, PAGE_SIZE};

use crate::guest_image::{ImageError, KernelImage, INFERENCE_KERNEL};
use crate::partition::{
    self, InferenceLinkError, PartitionConfig, PartitionError, PartitionOutcome, RunningPartition,
};

#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("the model in the partition cannot run: {0}")]
    ModelCannotRun(String),
    #[error("context size {requested} is out of range (1..={max}, the model's training context)")]
    ContextSize { requested: usize, max: usize },
    #[error(
        "{given} MiB of memory is too small for this model: at least {minimum} MiB are needed \
         (kernel {kernel_mib} MiB, session {session_mib} MiB for {n_ctx} tokens of context on {vcpus} vCPU(s), \
         tokenizer and buffers {buffers_mib} MiB, stacks {stacks_mib} MiB); raise --memory or lower --ctx-size"
    )]
    MemoryTooSmall {
        given: u64,
        minimum: u64,
        kernel_mib: u64,
        session_mib: u64,
        buffers_mib: u64,
        stacks_mib: u64,
        n_ctx: usize,
        vcpus: u32,
    },
    #[error("inference kernel image: {0}")]
    Image(#[from] ImageError),
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error("the partition did not report ready within {0:?}")]
    ReadyTimeout(Duration),
    #[error("the partition ended (guest exit status {0}) while it was expected to serve requests")]
    UnexpectedExit(u64),
    #[error("{0}")]
    Link(#[from] InferenceLinkError),
    #[error("the partition refused the request: {0}")]
    BadRequest(String),
    #[error("generation in the partition failed: {0}")]
    Engine(String),
    #[error("the partition sent an event out of order: {0}")]
    Protocol(String),
    #[error("the partition has already ended")]
    Ended,
}

/// Bytes of stack per vCPU of an inference partition.
pub const STACK_BYTES: u64 = 1 << 20;
/// Heap bytes beyond the estimate in a partition sized by default (not
/// touched at warm-up, so they cost nothing until used).
const DEFAULT_SLACK: u64 = 32 << 20;

/// How much guest memory a model needs, and what the partition's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub limits: SessionLimits,
    pub vcpus: u32,
    /// End of the kernel image in guest memory.
    pub kernel_bytes: u64,
    /// What `Session::new` allocates.
    pub session_bytes: u64,
    /// Tokenizer, request and event buffers, sampler, allocator slack.
    pub buffers_bytes: u64,
    pub stacks_bytes: u64,
    /// The smallest memory the partition may have (a multiple of 2 MiB).
    pub minimum_bytes: u64,
    /// What the partition gets when no size is given.
    pub default_bytes: u64,
    /// Heap bytes the guest touches before loading (all it is expected to use).
    pub warmup_heap_bytes: u64,
}

/// Sizes a partition for `model`: `n_ctx` 0 means the engine's default
/// (4096 or the model's training context, if smaller), `max_batch` 0 the
/// engine's default batch.
pub fn plan_memory(
    model: &Model<'_>,
    n_ctx: usize,
    max_batch: usize,
    vcpus: u32,
) -> Result<MemoryPlan, InferenceError> {
    let mut limits = SessionLimits::for_model(&model.config, vcpus as usize);
    if n_ctx != 0 {
        if n_ctx > model.config.n_ctx_train {
            return Err(InferenceError::ContextSize {
                requested: n_ctx,
                max: model.config.n_ctx_train,
            });
        }
        limits.n_ctx = n_ctx;
    }
    if max_batch != 0 {
        limits.max_batch = max_batch;
    }
    let kernel_bytes = KernelImage::parse(INFERENCE_KERNEL)?
        .load_end
        .next_multiple_of(PAGE_SIZE);
    let session_bytes = Session::memory_required(model, &limits) as u64;
    let n_vocab = model.config.n_vocab as u64;
    let n_ctx = limits.n_ctx as u64;
    // Measured: the tokenizer takes ~50 bytes per vocabulary entry; the
    // sampler ~12 per entry while generating. The request buffer and the
    // copy of each request; the context's token ids; then 1/16 for the
    // allocator's fragmentation and 4 MiB for everything small.
    let tokenizer = 64 * n_vocab + (1 << 20);
    let sampler = 16 * n_vocab;
    let requests = 2 * abi::request_buffer_bytes(limits.n_ctx) as u64 + 8 * n_ctx;
    let heap = session_bytes + tokenizer + sampler + requests;
    let heap = heap + heap / 16 + (4 << 20);
    let buffers_bytes = heap - session_bytes;
    let stacks_bytes = vcpus as u64 * (STACK_BYTES + PAGE_SIZE);
    let minimum_bytes = (kernel_bytes + heap + stacks_bytes).next_multiple_of(LARGE_PAGE_SIZE);
    let default_bytes = (minimum_bytes + DEFAULT_SLACK).next_multiple_of(LARGE_PAGE_SIZE);
    Ok(MemoryPlan {
        limits,
        vcpus,
        kernel_bytes,
        session_bytes,
        buffers_bytes,
        stacks_bytes,
        minimum_bytes,
        default_bytes,
        warmup_heap_bytes: heap.next_multiple_of(PAGE_SIZE),
    })
}

impl MemoryPlan {
    /// `given` bytes, or the default; an error naming the minimum when too small.
    pub fn memory_bytes(&self, given: Option<u64>) -> Result<u64, InferenceError> {
        let Some(given) = given else {
            return Ok(self.default_bytes);
        };
        let given = given.next_multiple_of(LARGE_PAGE_SIZE);
        if given < self.minimum_bytes {
            let mib = |bytes: u64| bytes.div_ceil(1 << 20);
            return Err(InferenceError::MemoryTooSmall {
                given: mib(given),
                minimum: mib(self.minimum_bytes),
                kernel_mib: mib(self.kernel_bytes),
                session_mib: mib(self.session_bytes),
                buffers_mib: mib(self.buffers_bytes),
                stacks_mib: mib(self.stacks_bytes),
                n_ctx: self.limits.n_ctx,
                vcpus: self.vcpus,
            });
        }
        Ok(given)
    }

    /// The partition's inference settings.
    pub fn setup(&self) -> partition::InferenceSetup {
        partition::InferenceSetup {
            n_ctx: self.limits.n_ctx as u32,
            max_batch: self.limits.max_batch as u32,
            warmup_heap_bytes: self.warmup_heap_bytes,
        }
    }
}

/// How the partition got ready.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    /// What the guest reported.
    pub info: ReadyInfo,
    /// VMM set-up (VM, memory, image, page tables, devices).
    pub setup: Duration,
    /// From the start of the partition to the guest's READY event.
    pub ready: Duration,
    /// The guest's warm-up: touching its working memory and the model
    /// window, and `Session::new`, which zero-fills (so touches) every page
    /// of the session's memory.
    pub warmup: Duration,
    /// Touching the working memory, on every vCPU (part of `warmup`).
    pub warmup_heap: Duration,
    /// Touching the model window (part of `warmup`).
    pub warmup_window: Duration,
    /// `Session::new` in the guest (part of `warmup`).
    pub session: Duration,
    /// `Gguf::parse` + `Model::load` in the guest (part of the start).
    pub model_load: Duration,
    /// `Gguf::parse` alone (part of `model_load`).
    pub model_parse: Duration,
}

impl Ready {
    /// VMM + guest boot to ready, without the warm-up: the partition start.
    pub fn start(&self) -> Duration {
        self.ready.saturating_sub(self.warmup)
    }
}

/// The context of a request.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// Text, tokenized in the guest (BOS per the model, special tokens parsed).
    Text(&'a str),
    /// Token ids.
    Tokens(&'a [u32]),
}

/// One completion to run.
#[derive(Debug, Clone, Copy)]
pub struct GenerationRequest<'a> {
    /// The whole context (a chat: the whole conversation); the guest's session
    /// reuses the prefix it already holds.
    pub prompt: Prompt<'a>,
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    pub stop_at_eog: bool,
}

/// What a completion produced and how long it took (times from the guest's
/// TSC, from the moment the context was tokenized, like `generate --host`).
#[derive(Debug, Clone)]
pub struct Completion {
    pub request_id: u64,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    /// Tokens of the whole context, of it fed now, and reused from the cache.
    pub n_context: usize,
    pub n_fed: usize,
    pub n_reused: usize,
    pub prompt_ms: f64,
    pub ttft_ms: f64,
    /// Milliseconds after the start at which each token was sampled.
    pub token_ms: Vec<f64>,
    pub gen_ms: f64,
    /// Request sent to first token received, as the host saw it.
    pub host_ttft_ms: f64,
    /// Exits of the whole partition while the request ran: MMIO exits to the
    /// VMM (counted by the host) plus the request's event-queue notifications
    /// (counted by the guest; the host's total of them is
    /// [`InferencePartition::notifications`]).
    pub exits: u64,
    pub notifications: u64,
    /// The guest's heap peak so far.
    pub heap_peak: u64,
}

impl Completion {
    pub fn prompt_tok_s(&self) -> f64 {
        rate(self.n_fed, self.prompt_ms)
    }

    pub fn gen_tok_s(&self) -> f64 {
        rate(self.tokens.len().saturating_sub(1), self.gen_ms)
    }

    pub fn exits_per_token(&self) -> f64 {
        if self.tokens.is_empty() {
            self.exits as f64
        } else {
            self.exits as f64 / self.tokens.len() as f64
        }
    }
}

fn rate(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1e3 / ms
    } else {
        0.0
    }
}

fn stop_reason(code: u64) -> Result<StopReason, InferenceError> {
    Ok(match code {
        abi::STOP_END_OF_GENERATION => StopReason::EndOfGeneration,
        abi::STOP_MAX_TOKENS => StopReason::MaxTokens,
        abi::STOP_CONTEXT_FULL => StopReason::ContextFull,
        abi::STOP_CANCELLED => StopReason::Cancelled,
        other => {
            return Err(InferenceError::Protocol(format!(
                "unknown stop reason {other}"
            )))
        }
    })
}

/// The name `generate --host` uses for a SIMD level (the engine's `SimdLevel` in Debug form).
pub fn simd_name(code: u64) -> &'static str {
    match code {
        0 => "Scalar",
        1 => "Avx2",
        2 => "Avx512",
        3 => "Avx512Vnni",
        _ => "unknown",
    }
}

/// How often the host looks whether the partition ended while it waits.
const POLL: Duration = Duration::from_millis(20);

/// A partition that serves completions.
pub struct InferencePartition {
    partition: Option<RunningPartition>,
    ready: Ready,
    next_request_id: u64,
}

impl InferencePartition {
    /// Starts the partition (`config.inference` must be set) and waits up to
    /// `ready_timeout` for the guest to load the model and warm up.
    pub fn start(config: PartitionConfig, ready_timeout: Duration) -> Result<Self, InferenceError> {
        if config.inference.is_none() {
            return Err(InferenceError::Protocol(
                "the partition configuration has no inference device".into(),
            ));
        }
        let running = partition::start(config)?;
        let mut this = InferencePartition {
            partition: Some(running),
            ready: Ready {
                info: ReadyInfo::default(),
                setup: Duration::ZERO,
                ready: Duration::ZERO,
                warmup: Duration::ZERO,
                warmup_heap: Duration::ZERO,
                warmup_window: Duration::ZERO,
                model_load: Duration::ZERO,
                model_parse: Duration::ZERO,
                session: Duration::ZERO,
            },
            next_request_id: 1,
        };
        let deadline = Instant::now() + ready_timeout;
        let info = match this.next_event(Some(deadline))? {
            InferenceEvent::Ready(info) => info,
            other => {
                return Err(InferenceError::Protocol(format!(
                    "expected the ready event first, got {other:?}"
                )))
            }
        };
        let running = this.running()?;
        let ready_at = running.created_at().elapsed();
        let ticks = |t: u64| ticks_to_duration(t, running.tsc_khz());
        this.ready = Ready {
            info,
            setup: running.setup_time(),
            ready: ready_at,
            warmup: ticks(info.warmup_heap_ticks + info.warmup_window_ticks + info.session_ticks),
            warmup_heap: ticks(info.warmup_heap_ticks),
            warmup_window: ticks(info.warmup_window_ticks),
            model_load: ticks(info.parse_ticks + info.load_ticks),
            model_parse: ticks(info.parse_ticks),
            session: ticks(info.session_ticks),
        };
        Ok(this)
    }

    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// Whether the guest has ended (exited, faulted or was stopped).
    pub fn has_ended(&self) -> bool {
        self.partition
            .as_ref()
            .is_none_or(RunningPartition::has_ended)
    }

    fn running(&self) -> Result<&RunningPartition, InferenceError> {
        self.partition.as_ref().ok_or(InferenceError::Ended)
    }

    /// The next event, or the reason the partition ended, by `deadline`.
    fn next_event(&mut self, deadline: Option<Instant>) -> Result<InferenceEvent, InferenceError> {
        loop {
            let running = self.running()?;
            let link = running
                .inference()
                .ok_or_else(|| InferenceError::Protocol("no inference device".into()))?;
            if let Ok(event) = link.next_event(POLL) {
                return Ok(event);
            }
            if running.has_ended() {
                return Err(self.end_error());
            }
            if let Some(deadline) = deadline.filter(|&d| Instant::now() >= d) {
                return Err(InferenceError::ReadyTimeout(
                    deadline.saturating_duration_since(running.created_at()),
                ));
            }
        }
    }

    /// Waits for the ended partition and turns how it ended into an error.
    fn end_error(&mut self) -> InferenceError {
        let Some(running) = self.partition.take() else {
            return InferenceError::Ended;
        };
        ended_error(running.wait())
    }

    /// Runs one completion, calling `on_text` with each piece of text as its
    /// token arrives. When `on_text` returns [`Flow::Stop`] the guest is told
    /// to cancel the request: it stops after the token it is working on, and
    /// the completion ends with [`StopReason::Cancelled`] (pieces that were
    /// already on their way are still passed to `on_text`).
    pub fn generate(
        &mut self,
        request: &GenerationRequest<'_>,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<Completion, InferenceError> {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let (flags, payload) = match request.prompt {
            Prompt::Text(text) => (abi::FLAG_PROMPT_IS_TEXT, text.as_bytes().to_vec()),
            Prompt::Tokens(tokens) => (0, tokens.iter().flat_map(|t| t.to_le_bytes()).collect()),
        };
        let stop_flag = if request.stop_at_eog {
            abi::FLAG_STOP_AT_EOG
        } else {
            0
        };
        let sampling = request.sampling;
        let header = RequestHeader {
            kind: abi::REQUEST_GENERATE,
            flags: flags | stop_flag,
            request_id,
            max_tokens: request.max_tokens.min(u32::MAX as usize) as u32,
            payload_len: 0,
            temperature: sampling.temperature,
            top_k: sampling.top_k.min(u32::MAX as usize) as u32,
            top_p: sampling.top_p,
            min_p: sampling.min_p,
            repeat_penalty: sampling.repeat_penalty,
            repeat_last_n: sampling.repeat_last_n.min(u32::MAX as usize) as u32,
            seed: sampling.seed,
            reserved: 0,
        };
        let running = self.running()?;
        let tsc_khz = running.tsc_khz();
        let link = running
            .inference()
            .ok_or_else(|| InferenceError::Protocol("no inference device".into()))?;
        let mmio_exits_before = link.mmio_exits();
        let sent = Instant::now();
        link.submit(&header, &payload)?;

        let mut completion = Completion {
            request_id,
            tokens: Vec::new(),
            text: String::new(),
            stop: StopReason::MaxTokens,
            n_context: 0,
            n_fed: 0,
            n_reused: 0,
            prompt_ms: 0.0,
            ttft_ms: 0.0,
            token_ms: Vec::with_capacity(request.max_tokens.min(1 << 16)),
            gen_ms: 0.0,
            host_ttft_ms: 0.0,
            exits: 0,
            notifications: 0,
            heap_peak: 0,
        };
        let mut origin_tsc = None;
        let mut cancel_sent = false;
        let mut deliver = |text: &str, this: &Self| -> Result<(), InferenceError> {
            if on_text(text) == Flow::Stop && !cancel_sent {
                cancel_sent = true;
                this.send_cancel(request_id)?;
            }
            Ok(())
        };
        let ms_since = |origin: Option<u64>, tsc: u64| match origin {
            Some(origin) => tsc.saturating_sub(origin) as f64 / tsc_khz.max(1) as f64,
            None => 0.0,
        };
        loop {
            // No deadline: a long generation is not an error; a partition that
            // ends is noticed within POLL.
            let event = self.next_event(None)?;
            let check_id = |id: u64| {
                if id == request_id {
                    Ok(())
                } else {
                    Err(InferenceError::Protocol(format!(
                        "event for request {id} while request {request_id} runs"
                    )))
                }
            };
            match event {
                InferenceEvent::PromptProcessed {
                    request_id: id,
                    tsc,
                    n_context,
                    n_fed,
                    n_reused,
                    tokenized_tsc,
                    ..
                } => {
                    check_id(id)?;
                    origin_tsc = Some(tokenized_tsc);
                    completion.n_context = n_context as usize;
                    completion.n_fed = n_fed as usize;
                    completion.n_reused = n_reused as usize;
                    completion.prompt_ms = ms_since(origin_tsc, tsc);
                }
                InferenceEvent::Token {
                    request_id: id,
                    tsc,
                    id: token,
                    text,
                } => {
                    check_id(id)?;
                    if completion.tokens.is_empty() {
                        completion.host_ttft_ms = sent.elapsed().as_secs_f64() * 1e3;
                    }
                    completion.tokens.push(token);
                    completion.token_ms.push(ms_since(origin_tsc, tsc));
                    completion.text.push_str(&text);
                    deliver(&text, self)?;
                }
                InferenceEvent::Text {
                    request_id: id,
                    text,
                } => {
                    check_id(id)?;
                    completion.text.push_str(&text);
                    deliver(&text, self)?;
                }
                InferenceEvent::End {
                    request_id: id,
                    stop,
                    tokens,
                    heap_peak,
                    notifications,
                    ..
                } => {
                    check_id(id)?;
                    if tokens as usize != completion.tokens.len() {
                        return Err(InferenceError::Protocol(format!(
                            "the end event counts {tokens} tokens, {} arrived",
                            completion.tokens.len()
                        )));
                    }
                    completion.stop = stop_reason(stop)?;
                    completion.heap_peak = heap_peak;
                    completion.notifications = notifications;
                    completion.exits = link_mmio_exits(self.running()?)?
                        .saturating_sub(mmio_exits_before)
                        + notifications;
                    break;
                }
                InferenceEvent::Error {
                    request_id: id,
                    code,
                    message,
                } => {
                    check_id(id)?;
                    return Err(match code {
                        abi::ERROR_BAD_REQUEST => InferenceError::BadRequest(message),
                        _ => InferenceError::Engine(message),
                    });
                }
                InferenceEvent::Ready(_) => {
                    return Err(InferenceError::Protocol("a second ready event".into()))
                }
            }
        }
        completion.ttft_ms = completion
            .token_ms
            .first()
            .copied()
            .unwrap_or(completion.prompt_ms);
        completion.gen_ms = completion
            .token_ms
            .last()
            .map_or(0.0, |last| last - completion.ttft_ms);
        Ok(completion)
    }

    /// Tells the guest to stop generating `request_id`.
    fn send_cancel(&self, request_id: u64) -> Result<(), InferenceError> {
        let header = RequestHeader {
            kind: abi::REQUEST_CANCEL,
            request_id,
            ..RequestHeader::default()
        };
        let running = self.partition.as_ref().ok_or(InferenceError::Ended)?;
        let link = running
            .inference()
            .ok_or_else(|| InferenceError::Protocol("no inference device".into()))?;
        link.submit(&header, &[])?;
        Ok(())
    }

    /// Asks the guest to exit and waits (at most `timeout`) for the
    /// partition to end; [`InferenceError::Ended`] if it already had.
    pub fn exit(mut self, timeout: Duration) -> Result<PartitionOutcome, InferenceError> {
        let running = self.partition.take().ok_or(InferenceError::Ended)?;
        if let Some(link) = running.inference() {
            let header = RequestHeader {
                kind: abi::REQUEST_EXIT,
                ..RequestHeader::default()
            };
            // If the guest cannot take the request, the timeout stops it.
            let _ = link.submit(&header, &[]);
        }
        Ok(running.wait_timeout(timeout))
    }

    /// Exits counted by the host so far (MMIO exits + notifications).
    pub fn exits(&self) -> u64 {
        self.partition
            .as_ref()
            .and_then(RunningPartition::inference)
            .map_or(0, |link| link.exits())
    }

    /// Event-queue notifications the host has seen so far (the ready
    /// event's included).
    pub fn notifications(&self) -> u64 {
        self.partition
            .as_ref()
            .and_then(RunningPartition::inference)
            .map_or(0, |link| link.notifications())
    }
}

fn link_mmio_exits(running: &RunningPartition) -> Result<u64, InferenceError> {
    Ok(running
        .inference()
        .ok_or_else(|| InferenceError::Protocol("no inference device".into()))?
        .mmio_exits())
}

/// The error for a partition that ended while it should have been serving.
fn ended_error(outcome: PartitionOutcome) -> InferenceError {
    match outcome.result {
        Ok(status) => InferenceError::UnexpectedExit(status),
        Err(PartitionError::GuestFatal {
            code: fatal::MODEL,
            message,
            ..
        }) => InferenceError::ModelCannotRun(message),
        Err(error) => InferenceError::Partition(error),
    }
}

fn ticks_to_duration(ticks: u64, tsc_khz: u64) -> Duration {
    Duration::from_nanos((ticks as u128 * 1_000_000 / tsc_khz.max(1) as u128) as u64)
}
