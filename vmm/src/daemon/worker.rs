//! One partition in the daemon: a thread that owns the running partition
//! and takes, in order, its lifecycle requests and its completions (one
//! queue per partition, first come first served). A model swap boots the
//! new partition on another thread while this one keeps serving, and
//! switches between two completions once the new one is ready.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use aivmm_api::request::{ChatRole, CompletionJob, Prompt as ApiPrompt, Reply, StreamEvent};
use aivmm_api::types::{
    CompletionResult, FinishReason, LinuxExits, LinuxStatus, ModelInfo, PartitionInfo,
    PartitionKind, PartitionSpec, PartitionState,
};
use aivmm_api::{ApiError, ErrorCode};
use aivmm_engine::chat::{ChatTemplate, Message, Role};
use aivmm_engine::generate::{Flow, StopReason};
use aivmm_engine::sampling::SamplerConfig;
use tokio::sync::mpsc::UnboundedSender;

use super::linux::{self, LinuxPlan, LinuxRun};
use super::metrics::{CompletionRecord, Outcome, PartitionMetrics};
use super::stop_strings::StopStrings;
use crate::host_engine::MappedModel;
use crate::inference::{
    plan_memory, GenerationRequest, InferenceError, InferencePartition, Prompt,
};
use crate::isolation::{CgroupRequest, CgroupScope, IsolationConfig};
use crate::partition::{InferenceSetup, PartitionConfig};
use crate::run::{EXIT_TIMEOUT, READY_TIMEOUT};
use crate::vstate::memory::RamBacking;

/// Tokens per forward pass while a prompt is processed.
const PROMPT_BATCH: usize = 32;

/// Everything needed to boot (and reboot) a partition for one model.
#[derive(Debug, Clone)]
pub struct BootPlan {
    pub model: ModelInfo,
    pub vcpus: u32,
    /// One per vCPU, from the placer (empty until the partition is placed).
    pub host_cpus: Vec<usize>,
    /// The NUMA node of the memory, from the placer.
    pub numa_node: Option<u32>,
    pub memory_bytes: u64,
    pub hugepages: bool,
    pub setup: InferenceSetup,
    pub template: ChatTemplate,
}

/// What a partition boots: the inference kernel with a model, or a Linux guest.
#[derive(Debug, Clone)]
pub enum Plan {
    Inference(BootPlan),
    Linux(LinuxPlan),
}

impl Plan {
    pub fn kind(&self) -> PartitionKind {
        match self {
            Plan::Inference(_) => PartitionKind::Inference,
            Plan::Linux(_) => PartitionKind::Linux,
        }
    }

    /// The model it serves (None for a Linux guest).
    pub fn model(&self) -> Option<&ModelInfo> {
        match self {
            Plan::Inference(plan) => Some(&plan.model),
            Plan::Linux(_) => None,
        }
    }

    /// The model's name, or "" for a Linux guest.
    pub fn model_name(&self) -> &str {
        self.model().map_or("", |model| model.name.as_str())
    }

    pub fn memory_bytes(&self) -> u64 {
        match self {
            Plan::Inference(plan) => plan.memory_bytes,
            Plan::Linux(plan) => plan.memory_bytes,
        }
    }

    /// Where the placer put it.
    pub fn place(&mut self, host_cpus: Vec<usize>, node: u32) {
        let (cpus, numa_node) = match self {
            Plan::Inference(plan) => (&mut plan.host_cpus, &mut plan.numa_node),
            Plan::Linux(plan) => (&mut plan.host_cpus, &mut plan.numa_node),
        };
        *cpus = host_cpus;
        *numa_node = Some(node);
    }
}

/// Sizes a partition for `model` on the host (the model is mapped and
/// loaded here, so a model the engine cannot run is refused before boot).
/// The placer fills in the host CPUs and the node.
pub fn plan(
    model: ModelInfo,
    vcpus: u32,
    memory_mib: Option<u64>,
    hugepages: bool,
    context_length: Option<u32>,
) -> Result<BootPlan, ApiError> {
    let invalid =
        |param: &str, error: &dyn std::fmt::Display| ApiError::invalid(param, error.to_string());
    let path = std::path::Path::new(&model.path);
    let mapped = MappedModel::open(path).map_err(|e| invalid("model", &e))?;
    let gguf = mapped.parse().map_err(|e| invalid("model", &e))?;
    let loaded = mapped.load(&gguf).map_err(|e| invalid("model", &e))?;
    let memory_plan = plan_memory(
        &loaded,
        context_length.unwrap_or(0) as usize,
        PROMPT_BATCH,
        vcpus,
    )
    .map_err(|e| match e {
        InferenceError::ContextSize { .. } => invalid("context_length", &e),
        _ => invalid("model", &e),
    })?;
    let memory_bytes = memory_plan
        .memory_bytes(memory_mib.map(|mib| mib << 20))
        .map_err(|e| invalid("memory_mib", &e))?;
    Ok(BootPlan {
        template: ChatTemplate::for_model(&gguf, loaded.config.arch),
        model,
        vcpus,
        host_cpus: Vec::new(),
        numa_node: None,
        memory_bytes,
        hugepages,
        setup: memory_plan.setup(),
    })
}

/// The daemon's isolation switches (`aivmm serve --no-cgroup/--no-seccomp`),
/// set once at start-up: (cgroup, seccomp).
static ISOLATION: OnceLock<(bool, bool)> = OnceLock::new();

/// Sets what [`boot`] enforces; the default (never set) is everything.
pub fn set_isolation(cgroup: bool, seccomp: bool) {
    let _ = ISOLATION.set((cgroup, seccomp));
}

/// Whether partition threads (inference and Linux) get their seccomp filters.
pub fn seccomp_enabled() -> bool {
    ISOLATION.get_or_init(|| (true, true)).1
}

/// Boots `plan` for partition `id`: guest memory bound to the node the placer
/// chose, the vCPU and event threads in a cgroup of their own (one per boot: a
/// swap runs two at once) and under seccomp.
fn boot(plan: &BootPlan, id: &str) -> Result<InferencePartition, String> {
    let numa_node = plan.numa_node;
    let seccomp = seccomp_enabled();
    let config = PartitionConfig {
        numa_node,
        isolation: IsolationConfig {
            cgroup: cgroup_name(id).map(|name| CgroupRequest {
                name,
                scope: CgroupScope::Threads,
                memory_limit: None,
            }),
            seccomp,
        },
        vcpus: plan.vcpus,
        memory_bytes: plan.memory_bytes,
        backing: RamBacking::with_hugepages(plan.hugepages),
        host_cpus: Some(plan.host_cpus.clone()),
        stack_bytes: crate::inference::STACK_BYTES,
        model: Some(plan.model.path.clone().into()),
        console_forward: None,
        console_capture_limit: 1 << 16,
        guest_requests: Default::default(),
        inference: Some(plan.setup),
    };
    InferencePartition::start(config, READY_TIMEOUT).map_err(|error| error.to_string())
}

/// The cgroup of one boot of partition `id` (one per boot: a swap runs two
/// at once), or None when the daemon runs without cgroups.
fn cgroup_name(id: &str) -> Option<String> {
    static BOOTS: AtomicU64 = AtomicU64::new(0);
    let (cgroup, _) = *ISOLATION.get_or_init(|| (true, true));
    cgroup.then(|| format!("{id}-{}", BOOTS.fetch_add(1, Ordering::Relaxed)))
}

/// How often a worker looks at its Linux guest (has it ended? its exits).
const LINUX_WATCH: Duration = Duration::from_millis(200);

/// What the API sees of a partition (the worker writes it).
#[derive(Debug, Clone)]
pub struct Status {
    pub state: PartitionState,
    pub plan: Plan,
    pub running_since: Option<Instant>,
    pub error: Option<String>,
    pub swapping_to: Option<String>,
    /// Linux guests: the command line of the last boot, its exits, and how it ended.
    pub linux_cmdline: Option<String>,
    pub linux_exits: LinuxExits,
    pub linux_end: Option<String>,
}

/// Shared between the worker and the manager.
pub struct Shared {
    pub id: String,
    pub spec: PartitionSpec,
    status: Mutex<Status>,
    pub metrics: PartitionMetrics,
    /// Ends the running completion and fails queued ones (stop, delete).
    pub interrupt: AtomicBool,
    /// The worker has stopped the partition for good (deleted, or the
    /// manager went): its CPUs and memory may be handed out again.
    pub ended: AtomicBool,
}

impl Shared {
    pub fn status(&self) -> MutexGuard<'_, Status> {
        self.status
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub fn info(&self) -> PartitionInfo {
        let status = self.status().clone();
        let snapshot = self.metrics.snapshot();
        let uptime_secs = status.running_since.map(|t| t.elapsed().as_secs_f64());
        match status.plan {
            Plan::Inference(plan) => PartitionInfo {
                id: self.id.clone(),
                kind: PartitionKind::Inference,
                state: status.state,
                spec: self.spec.clone(),
                model: plan.model.name,
                model_path: plan.model.path,
                vcpus: plan.vcpus,
                host_cpus: plan.host_cpus,
                numa_node: plan.numa_node,
                memory_mib: plan.memory_bytes >> 20,
                hugepages: plan.hugepages,
                context_length: plan.setup.n_ctx,
                uptime_secs,
                error: status.error,
                swapping_to: status.swapping_to,
                counters: snapshot.counters,
                devices: Vec::new(),
                linux: None,
            },
            Plan::Linux(plan) => PartitionInfo {
                id: self.id.clone(),
                kind: PartitionKind::Linux,
                state: status.state,
                spec: self.spec.clone(),
                model: String::new(),
                model_path: String::new(),
                vcpus: plan.vcpus,
                host_cpus: plan.host_cpus,
                numa_node: plan.numa_node,
                memory_mib: plan.memory_bytes >> 20,
                hugepages: plan.hugepages,
                context_length: 0,
                uptime_secs,
                error: status.error,
                swapping_to: None,
                counters: snapshot.counters,
                devices: plan.devices.iter().map(ToString::to_string).collect(),
                linux: Some(LinuxStatus {
                    kernel: plan.kernel.display().to_string(),
                    initrd: plan.initrd.map(|path| path.display().to_string()),
                    cmdline: status.linux_cmdline.unwrap_or(plan.cmdline),
                    end: status.linux_end,
                    exits: status.linux_exits,
                    console_bytes: std::fs::metadata(&plan.console_log).map_or(0, |m| m.len()),
                }),
            },
        }
    }
}

pub enum WorkerMessage {
    Start(Option<Reply<PartitionInfo>>),
    Stop(Reply<PartitionInfo>),
    Restart(Reply<PartitionInfo>),
    Swap(Box<BootPlan>, Reply<PartitionInfo>),
    /// From the swap's boot thread.
    SwapReady(
        Box<BootPlan>,
        Result<InferencePartition, String>,
        Reply<PartitionInfo>,
    ),
    Complete(Box<CompletionJob>, UnboundedSender<StreamEvent>),
    /// Stop and end the worker.
    Delete(Reply<()>),
}

pub struct Worker {
    shared: Arc<Shared>,
    running: Option<InferencePartition>,
    linux: Option<LinuxRun>,
    inbox: Receiver<WorkerMessage>,
    outbox: Sender<WorkerMessage>,
}

impl Worker {
    pub fn new(
        id: String,
        spec: PartitionSpec,
        plan: Plan,
        inbox: Receiver<WorkerMessage>,
        outbox: Sender<WorkerMessage>,
    ) -> (Worker, Arc<Shared>) {
        let shared = Arc::new(Shared {
            id,
            spec,
            status: Mutex::new(Status {
                state: PartitionState::Stopped,
                plan,
                running_since: None,
                error: None,
                swapping_to: None,
                linux_cmdline: None,
                linux_exits: LinuxExits::default(),
                linux_end: None,
            }),
            metrics: PartitionMetrics::default(),
            interrupt: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        });
        let worker = Worker {
            shared: shared.clone(),
            running: None,
            linux: None,
            inbox,
            outbox,
        };
        (worker, shared)
    }

    /// Takes messages until the partition is deleted (or the manager goes).
    pub fn run(mut self) {
        loop {
            let message = if self.linux.is_some() {
                match self.inbox.recv_timeout(LINUX_WATCH) {
                    Ok(message) => message,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        self.watch_linux();
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match self.inbox.recv() {
                    Ok(message) => message,
                    Err(_) => break,
                }
            };
            match message {
                WorkerMessage::Start(reply) => {
                    let result = self.start().map(|()| self.shared.info());
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
                WorkerMessage::Stop(reply) => {
                    self.stop();
                    let _ = reply.send(Ok(self.shared.info()));
                }
                WorkerMessage::Restart(reply) => {
                    self.stop();
                    let result = self.start().map(|()| self.shared.info());
                    let _ = reply.send(result);
                }
                WorkerMessage::Swap(plan, reply) => self.begin_swap(*plan, reply),
                WorkerMessage::SwapReady(plan, result, reply) => {
                    let _ = reply.send(self.finish_swap(*plan, result));
                }
                WorkerMessage::Complete(job, events) => {
                    self.complete(&job, &events);
                    self.shared
                        .metrics
                        .queue_depth
                        .fetch_sub(1, Ordering::Relaxed);
                }
                WorkerMessage::Delete(reply) => {
                    self.stop();
                    // Completions still queued behind the delete end too.
                    while let Ok(message) = self.inbox.try_recv() {
                        self.refuse(message);
                    }
                    self.shared.ended.store(true, Ordering::SeqCst);
                    let _ = reply.send(Ok(()));
                    return;
                }
            }
        }
        self.stop();
        self.shared.ended.store(true, Ordering::SeqCst);
    }

    /// Answers a message that arrived after the delete.
    fn refuse(&self, message: WorkerMessage) {
        let gone = || {
            ApiError::new(
                ErrorCode::PartitionGone,
                format!("partition {} was deleted", self.shared.id),
            )
        };
        match message {
            WorkerMessage::Start(Some(reply))
            | WorkerMessage::Stop(reply)
            | WorkerMessage::Restart(reply)
            | WorkerMessage::Swap(_, reply)
            | WorkerMessage::SwapReady(_, _, reply) => {
                let _ = reply.send(Err(gone()));
            }
            WorkerMessage::Complete(_, events) => {
                let _ = events.send(StreamEvent::Error(gone()));
                self.shared
                    .metrics
                    .queue_depth
                    .fetch_sub(1, Ordering::Relaxed);
            }
            WorkerMessage::Delete(reply) => {
                let _ = reply.send(Ok(()));
            }
            WorkerMessage::Start(None) => {}
        }
    }

    fn set_state(&self, state: PartitionState) {
        self.shared.status().state = state;
    }

    fn start(&mut self) -> Result<(), ApiError> {
        self.shared.interrupt.store(false, Ordering::SeqCst);
        if self.running.as_ref().is_some_and(|p| !p.has_ended()) {
            return Ok(());
        }
        if self
            .linux
            .as_ref()
            .is_some_and(|run| run.vm.end().is_none())
        {
            return Ok(());
        }
        if self.linux.is_some() {
            // A Linux guest that ended by itself is stopped before it boots again.
            self.stop();
        }
        let plan = {
            let mut status = self.shared.status();
            status.state = PartitionState::Starting;
            status.error = None;
            status.plan.clone()
        };
        let plan = match plan {
            Plan::Inference(plan) => plan,
            Plan::Linux(plan) => return self.start_linux(&plan),
        };
        match boot(&plan, &self.shared.id) {
            Ok(partition) => {
                self.running = Some(partition);
                drop(self.booted(plan.memory_bytes));
                Ok(())
            }
            Err(why) => Err(self.boot_failed(&why)),
        }
    }

    /// Records a boot of a guest with `memory_bytes` of RAM: the partition is
    /// running. Returns the status, still locked, for what else the kind of
    /// partition records.
    fn booted(&self, memory_bytes: u64) -> MutexGuard<'_, Status> {
        self.shared
            .metrics
            .guest_memory_bytes
            .store(memory_bytes, Ordering::Relaxed);
        self.shared.metrics.record_boot();
        let mut status = self.shared.status();
        status.state = PartitionState::Running;
        status.running_since = Some(Instant::now());
        status
    }

    /// Marks the partition failed because it did not boot, and says so.
    fn boot_failed(&self, why: &dyn std::fmt::Display) -> ApiError {
        let message = format!("partition {} did not boot: {why}", self.shared.id);
        let mut status = self.shared.status();
        status.state = PartitionState::Failed;
        status.error = Some(message.clone());
        ApiError::new(ErrorCode::PartitionFailed, message)
    }

    fn start_linux(&mut self, plan: &LinuxPlan) -> Result<(), ApiError> {
        match linux::boot(plan, cgroup_name(&self.shared.id)) {
            Ok(run) => {
                let mut status = self.booted(plan.memory_bytes);
                status.linux_cmdline = Some(run.vm.cmdline.clone());
                status.linux_exits = LinuxExits::default();
                status.linux_end = None;
                drop(status);
                self.linux = Some(run);
                Ok(())
            }
            Err(why) => Err(self.boot_failed(&why)),
        }
    }

    /// Updates the Linux guest's exits; if it has ended by itself, stops it
    /// (joining its threads) and records how it ended: powered off or
    /// rebooted is stopped, anything else failed.
    fn watch_linux(&mut self) {
        let Some(run) = &self.linux else {
            return;
        };
        let vcpus = match &self.shared.status().plan {
            Plan::Linux(plan) => plan.vcpus,
            Plan::Inference(_) => 0,
        };
        let exits = run.exits(vcpus);
        let ended = run.vm.end().is_some();
        self.shared
            .metrics
            .vcpu_exits
            .store(exits.io_in + exits.io_out + exits.mmio, Ordering::Relaxed);
        self.shared.status().linux_exits = exits;
        if ended {
            self.stop();
        }
    }

    fn stop(&mut self) {
        if let Some(partition) = self.running.take() {
            self.set_state(PartitionState::Stopping);
            // A guest that does not take the exit request is stopped by the
            // timeout; either way its threads are joined.
            let _ = partition.exit(EXIT_TIMEOUT);
        }
        if let Some(run) = self.linux.take() {
            let vcpus = match &self.shared.status().plan {
                Plan::Linux(plan) => plan.vcpus,
                Plan::Inference(_) => 0,
            };
            let exits = run.exits(vcpus);
            let end = run.stop();
            let mut status = self.shared.status();
            status.linux_exits = exits;
            status.linux_end = Some(end.to_string());
            if !linux::ended_cleanly(&end) {
                status.state = PartitionState::Failed;
                status.error = Some(format!(
                    "the Linux guest of partition {} failed: {end}",
                    self.shared.id
                ));
            }
        }
        let mut status = self.shared.status();
        if status.state != PartitionState::Failed {
            status.state = PartitionState::Stopped;
        }
        status.running_since = None;
        self.shared
            .metrics
            .guest_memory_bytes
            .store(0, Ordering::Relaxed);
        drop(status);
        self.shared.interrupt.store(false, Ordering::SeqCst);
    }

    fn begin_swap(&mut self, plan: BootPlan, reply: Reply<PartitionInfo>) {
        {
            let mut status = self.shared.status();
            if let Some(other) = &status.swapping_to {
                let _ = reply.send(Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("a swap to {other} is already under way; wait for it"),
                )));
                return;
            }
            if matches!(status.plan, Plan::Linux(_)) {
                let _ = reply.send(Err(linux_has_no_model(&self.shared.id)));
                return;
            }
            if status.state != PartitionState::Running {
                // Nothing serves: take the new model for the next start.
                status.plan = Plan::Inference(plan);
                status.error = None;
                drop(status);
                let _ = reply.send(Ok(self.shared.info()));
                return;
            }
            status.swapping_to = Some(plan.model.name.clone());
        }
        let outbox = self.outbox.clone();
        let id = self.shared.id.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("swap-{}", self.shared.id))
            .spawn(move || {
                let result = boot(&plan, &id);
                let _ = outbox.send(WorkerMessage::SwapReady(Box::new(plan), result, reply));
            });
        if let Err(error) = spawned {
            self.shared.status().swapping_to = None;
            // The reply went with the closure that could not be spawned.
            eprintln!("aivmm serve: cannot start a model swap thread: {error}");
        }
    }

    fn finish_swap(
        &mut self,
        plan: BootPlan,
        result: Result<InferencePartition, String>,
    ) -> Result<PartitionInfo, ApiError> {
        self.shared.status().swapping_to = None;
        let new = match result {
            Ok(new) => new,
            Err(why) => {
                let message = format!(
                    "model swap to {} refused: the new partition did not boot ({why}); {} keeps serving",
                    plan.model.name,
                    self.shared.status().plan.model_name()
                );
                self.shared.status().error = Some(message.clone());
                return Err(ApiError::new(ErrorCode::PartitionFailed, message));
            }
        };
        if self.shared.interrupt.load(Ordering::SeqCst) || self.running.is_none() {
            // Stopped or deleted meanwhile: the new partition is not wanted.
            let _ = new.exit(EXIT_TIMEOUT);
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "partition {} was stopped during the model swap",
                    self.shared.id
                ),
            ));
        }
        let old = self.running.replace(new);
        {
            let mut status = self.shared.status();
            status.plan = Plan::Inference(plan);
            status.error = None;
            status.running_since = Some(Instant::now());
            status.state = PartitionState::Running;
        }
        self.shared.metrics.record_boot();
        if let Some(old) = old {
            let _ = old.exit(EXIT_TIMEOUT);
        }
        Ok(self.shared.info())
    }

    fn complete(&mut self, job: &CompletionJob, events: &UnboundedSender<StreamEvent>) {
        let id = self.shared.id.clone();
        let fail = |error: ApiError| {
            let _ = events.send(StreamEvent::Error(error));
        };
        if self.shared.interrupt.load(Ordering::SeqCst) {
            return fail(ApiError::new(
                ErrorCode::PartitionGone,
                format!("partition {id} was stopped before this request ran"),
            ));
        }
        let plan = match self.shared.status().plan.clone() {
            Plan::Inference(plan) => plan,
            Plan::Linux(_) => return fail(linux_has_no_model(&id)),
        };
        let Some(partition) = self.running.as_mut() else {
            let status = self.shared.status();
            return fail(match status.state {
                PartitionState::Failed => ApiError::new(
                    ErrorCode::PartitionFailed,
                    format!(
                        "partition {id} has failed ({}); restart it",
                        status.error.as_deref().unwrap_or("no reason recorded")
                    ),
                ),
                _ => ApiError::new(
                    ErrorCode::Conflict,
                    format!("partition {id} is not running; start it first"),
                ),
            });
        };
        let text = match &job.prompt {
            ApiPrompt::Text(text) => text.clone(),
            ApiPrompt::Chat(turns) => {
                let messages: Vec<Message<'_>> = turns
                    .iter()
                    .map(|(role, content)| Message {
                        role: match role {
                            ChatRole::System => Role::System,
                            ChatRole::User => Role::User,
                            ChatRole::Assistant => Role::Assistant,
                        },
                        content,
                    })
                    .collect();
                plan.template.render(&messages, true)
            }
        };
        let sampling = SamplerConfig {
            temperature: job.sampling.temperature,
            top_k: job.sampling.top_k as usize,
            top_p: job.sampling.top_p,
            min_p: job.sampling.min_p,
            repeat_penalty: job.sampling.repeat_penalty,
            repeat_last_n: job.sampling.repeat_last_n as usize,
            seed: job.sampling.seed,
        };
        let request = GenerationRequest {
            prompt: Prompt::Text(&text),
            max_tokens: job.max_tokens.map_or(usize::MAX, |n| n as usize),
            sampling,
            stop_at_eog: !job.ignore_eos,
        };
        let mut stops = StopStrings::new(&job.stop);
        let mut sent = String::new();
        let mut hit_stop = false;
        let mut client_gone = false;
        let mut first_text_at = None;
        let interrupt = &self.shared.interrupt;
        let result = partition.generate(&request, &mut |piece| {
            if hit_stop || client_gone {
                return Flow::Stop;
            }
            first_text_at.get_or_insert_with(Instant::now);
            let step = stops.push(piece);
            if !step.emit.is_empty() {
                sent.push_str(&step.emit);
                if events.send(StreamEvent::Text(step.emit)).is_err() {
                    client_gone = true;
                    return Flow::Stop;
                }
            }
            if step.stopped {
                hit_stop = true;
                return Flow::Stop;
            }
            if interrupt.load(Ordering::SeqCst) {
                return Flow::Stop;
            }
            Flow::Continue
        });
        self.shared
            .metrics
            .vcpu_exits
            .store(partition.exits(), Ordering::Relaxed);
        let completion = match result {
            Ok(completion) => completion,
            Err(error) => {
                let alive = !partition.has_ended();
                self.shared.metrics.record(&CompletionRecord {
                    outcome: Outcome::Failed,
                    prompt_tokens: 0,
                    tokens: 0,
                    tokens_per_sec: 0.0,
                    ttft_ms: None,
                    token_ms: &[],
                });
                if let InferenceError::BadRequest(why) = &error {
                    return fail(ApiError::new(ErrorCode::InvalidRequest, why.clone()));
                }
                let message = format!("partition {id} failed during the completion: {error}");
                if !alive {
                    self.running = None;
                    let mut status = self.shared.status();
                    status.state = PartitionState::Failed;
                    status.running_since = None;
                    status.error = Some(message.clone());
                }
                return fail(ApiError::new(ErrorCode::PartitionFailed, message));
            }
        };
        let interrupted = interrupt.load(Ordering::SeqCst) && !hit_stop;
        let cancelled = completion.stop == StopReason::Cancelled && !hit_stop;
        self.shared.metrics.record(&CompletionRecord {
            outcome: if cancelled {
                Outcome::Cancelled
            } else {
                Outcome::Completed
            },
            prompt_tokens: completion.n_fed as u64,
            tokens: completion.tokens.len() as u64,
            tokens_per_sec: completion.gen_tok_s(),
            ttft_ms: (!completion.tokens.is_empty()).then_some(completion.ttft_ms),
            token_ms: &completion.token_ms,
        });
        if interrupted {
            return fail(ApiError::new(
                ErrorCode::PartitionGone,
                format!("partition {id} was stopped or deleted while this request ran"),
            ));
        }
        if client_gone {
            return;
        }
        if !hit_stop {
            let tail = stops.finish();
            if !tail.is_empty() {
                sent.push_str(&tail);
                let _ = events.send(StreamEvent::Text(tail));
            }
        }
        let finish_reason = if hit_stop {
            FinishReason::Stop
        } else {
            match completion.stop {
                StopReason::EndOfGeneration => FinishReason::Stop,
                StopReason::MaxTokens => FinishReason::Length,
                StopReason::ContextFull => FinishReason::ContextFull,
                StopReason::Cancelled => FinishReason::Cancelled,
            }
        };
        let queue_ms = first_text_at
            .map(|at| {
                at.saturating_duration_since(job.received).as_secs_f64() * 1e3 - completion.ttft_ms
            })
            .unwrap_or(0.0)
            .max(0.0);
        let result = CompletionResult {
            partition: id,
            model: plan.model.name.clone(),
            text: sent,
            finish_reason,
            prompt_tokens: completion.n_context as u64,
            prompt_tokens_processed: completion.n_fed as u64,
            prompt_tokens_reused: completion.n_reused as u64,
            completion_tokens: completion.tokens.len() as u64,
            ttft_ms: completion.ttft_ms,
            prompt_tokens_per_sec: completion.prompt_tok_s(),
            tokens_per_sec: completion.gen_tok_s(),
            queue_ms,
            vcpu_exits: completion.exits,
        };
        let _ = events.send(StreamEvent::Done(Box::new(result)));
    }
}

/// The refusal of a model operation (a completion, a swap) on a Linux partition.
pub fn linux_has_no_model(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Conflict,
        format!(
            "partition {id} runs a Linux guest, not a model: completions and model swaps go to inference partitions"
        ),
    )
}
