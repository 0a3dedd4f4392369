//! The partition manager: the daemon's one owner of partitions and models.
//! It takes the API's typed requests one at a time on its own thread, checks
//! them against what exists, and hands each partition's work to that
//! partition's worker; nothing slow (a boot, a completion) runs here, so
//! listing and telemetry answer at once while partitions boot or generate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use aivmm_api::request::{
    ApiRequest, CompletionJob, CompletionStream, PartitionAction, Reply, Target,
};
use aivmm_api::types::*;
use aivmm_api::{ApiError, ErrorCode};
use tokio::sync::mpsc::UnboundedReceiver;

use super::metrics::{self, MetricsRow};
use super::models::ModelRegistry;
use super::worker::{self, Shared, Worker, WorkerMessage};
use crate::run::{allowed_cpus, online_cpus};

/// Completions a partition holds (running and waiting) before it answers
/// `queue_full`.
pub const MAX_QUEUE: u64 = 64;

struct Handle {
    shared: Arc<Shared>,
    outbox: mpsc::Sender<WorkerMessage>,
    thread: Option<JoinHandle<()>>,
}

pub struct Manager {
    partitions: BTreeMap<String, Handle>,
    models: ModelRegistry,
    started: Instant,
}

impl Manager {
    pub fn new(models: ModelRegistry) -> Manager {
        Manager {
            partitions: BTreeMap::new(),
            models,
            started: Instant::now(),
        }
    }

    /// Serves requests until every sender is gone, then stops every partition.
    pub fn run(mut self, mut requests: UnboundedReceiver<ApiRequest>) {
        while let Some(request) = requests.blocking_recv() {
            self.handle(request);
        }
        self.shutdown();
    }

    /// Stops every partition and waits for their workers.
    pub fn shutdown(&mut self) {
        let ids: Vec<String> = self.partitions.keys().cloned().collect();
        for id in ids {
            let (reply, answer) = tokio::sync::oneshot::channel();
            self.delete(&id, reply);
            let _ = answer.blocking_recv();
        }
        for handle in self.partitions.values_mut() {
            if let Some(thread) = handle.thread.take() {
                let _ = thread.join();
            }
        }
    }

    fn handle(&mut self, request: ApiRequest) {
        match request {
            ApiRequest::Health(reply) => {
                let _ = reply.send(Ok(self.health()));
            }
            ApiRequest::ListPartitions(reply) => {
                let list = self.partitions.values().map(|h| h.shared.info()).collect();
                let _ = reply.send(Ok(list));
            }
            ApiRequest::CreatePartition(spec, reply) => self.create(spec, reply),
            ApiRequest::GetPartition(id, reply) => {
                let _ = reply.send(self.handle_of(&id).map(|h| h.shared.info()));
            }
            ApiRequest::PartitionAction(id, action, reply) => self.action(&id, action, reply),
            ApiRequest::DeletePartition(id, reply) => self.delete(&id, reply),
            ApiRequest::SwapModel(id, swap, reply) => self.swap(&id, swap, reply),
            ApiRequest::ListModels(reply) => {
                let _ = reply.send(Ok(self.list_models()));
            }
            ApiRequest::RegisterModel(registration, reply) => {
                let result = self
                    .models
                    .register(&registration.name, Path::new(&registration.path));
                let _ = reply.send(result);
            }
            ApiRequest::Complete(job, reply) => {
                let _ = reply.send(self.complete(*job));
            }
            ApiRequest::Stats(reply) => {
                let _ = reply.send(Ok(self.stats()));
            }
            ApiRequest::Metrics(reply) => {
                let _ = reply.send(Ok(self.metrics()));
            }
        }
    }

    fn handle_of(&self, id: &str) -> Result<&Handle, ApiError> {
        self.partitions.get(id).ok_or_else(|| {
            ApiError::new(ErrorCode::NotFound, format!("no partition {id:?}"))
        })
    }

    fn health(&self) -> Health {
        let running = self
            .partitions
            .values()
            .filter(|h| h.shared.status().state == PartitionState::Running)
            .count();
        Health {
            status: "ok".into(),
            partitions: self.partitions.len() as u64,
            partitions_running: running as u64,
            uptime_secs: self.started.elapsed().as_secs_f64(),
        }
    }

    /// Host CPUs held by partitions, and by which.
    fn cpus_in_use(&self, except: Option<&str>) -> BTreeMap<usize, String> {
        let mut used = BTreeMap::new();
        for (id, handle) in &self.partitions {
            if Some(id.as_str()) == except {
                continue;
            }
            for &cpu in &handle.shared.status().plan.host_cpus {
                used.insert(cpu, id.clone());
            }
        }
        used
    }

    /// One host CPU per vCPU, none shared with another partition.
    fn place(&self, spec: &PartitionSpec) -> Result<Vec<usize>, ApiError> {
        let used = self.cpus_in_use(None);
        let allowed: BTreeSet<usize> = allowed_cpus()
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("cannot read the daemon's CPU affinity: {e}")))?
            .into_iter()
            .collect();
        let online: Option<BTreeSet<usize>> = online_cpus().map(|cpus| cpus.into_iter().collect());
        let usable = |cpu: usize| allowed.contains(&cpu) && online.as_ref().is_none_or(|o| o.contains(&cpu));
        let describe_use = || {
            if used.is_empty() {
                "none in use".to_string()
            } else {
                used.iter()
                    .map(|(cpu, id)| format!("CPU {cpu} by {id}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        if let Some(cores) = &spec.cores {
            let mut seen = BTreeSet::new();
            for &cpu in cores {
                if !seen.insert(cpu) {
                    return Err(ApiError::invalid("cores", format!("CPU {cpu} is listed twice")));
                }
                if !usable(cpu) {
                    return Err(ApiError::invalid(
                        "cores",
                        format!("host CPU {cpu} is offline, missing or outside the daemon's CPU affinity"),
                    ));
                }
                if let Some(owner) = used.get(&cpu) {
                    return Err(ApiError::new(
                        ErrorCode::ResourcesExhausted,
                        format!("cores: host CPU {cpu} is already given to partition {owner}"),
                    ));
                }
            }
            return Ok(cores.clone());
        }
        let vcpus = spec.vcpus.unwrap_or(1) as usize;
        let free: Vec<usize> = allowed
            .iter()
            .copied()
            .filter(|&cpu| usable(cpu) && !used.contains_key(&cpu))
            .collect();
        if free.len() < vcpus {
            return Err(ApiError::new(
                ErrorCode::ResourcesExhausted,
                format!(
                    "not enough free host cores: partition {} needs {vcpus}, {} free ({}); delete a partition or ask for fewer vCPUs",
                    spec.id,
                    free.len(),
                    describe_use()
                ),
            ));
        }
        Ok(free[..vcpus].to_vec())
    }

    fn create(&mut self, spec: PartitionSpec, reply: Reply<PartitionInfo>) {
        let result = (|| {
            validate_partition_id(&spec.id).map_err(|why| ApiError::invalid("id", why))?;
            if self.partitions.contains_key(&spec.id) {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("partition {} already exists", spec.id),
                ));
            }
            if let Some(vcpus) = spec.vcpus {
                if vcpus == 0 || vcpus > aivmm_guest_abi::MAX_VCPUS {
                    return Err(ApiError::invalid(
                        "vcpus",
                        format!("must be 1 to {}", aivmm_guest_abi::MAX_VCPUS),
                    ));
                }
            }
            if spec.numa_node.is_some_and(|node| node != 0) && !Path::new("/sys/devices/system/node").exists() {
                return Err(ApiError::invalid("numa_node", "this host has no NUMA nodes but node 0"));
            }
            let model = self.models.resolve(&spec.model, "model")?;
            let host_cpus = self.place(&spec)?;
            worker::plan(model, host_cpus, spec.memory_mib, spec.hugepages, spec.context_length)
        })();
        let plan = match result {
            Ok(plan) => plan,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        let (outbox, inbox) = mpsc::channel();
        let (worker, shared) = Worker::new(spec.id.clone(), spec.clone(), plan, inbox, outbox.clone());
        let thread = match std::thread::Builder::new()
            .name(format!("partition-{}", spec.id))
            .spawn(move || worker.run())
        {
            Ok(thread) => thread,
            Err(error) => {
                let _ = reply.send(Err(ApiError::new(
                    ErrorCode::Internal,
                    format!("cannot start the partition's thread: {error}"),
                )));
                return;
            }
        };
        let start = spec.start;
        self.partitions.insert(
            spec.id.clone(),
            Handle {
                shared: shared.clone(),
                outbox: outbox.clone(),
                thread: Some(thread),
            },
        );
        if start {
            shared.status().state = PartitionState::Starting;
            if let Err(std::sync::mpsc::SendError(WorkerMessage::Start(Some(reply)))) =
                outbox.send(WorkerMessage::Start(Some(reply)))
            {
                let _ = reply.send(Err(worker_gone(&spec.id)));
            }
        } else {
            let _ = reply.send(Ok(shared.info()));
        }
    }

    fn action(&mut self, id: &str, action: PartitionAction, reply: Reply<PartitionInfo>) {
        let handle = match self.handle_of(id) {
            Ok(handle) => handle,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        let message = match action {
            PartitionAction::Start => WorkerMessage::Start(Some(reply)),
            PartitionAction::Stop => {
                handle.shared.interrupt.store(true, Ordering::SeqCst);
                WorkerMessage::Stop(reply)
            }
            PartitionAction::Restart => {
                handle.shared.interrupt.store(true, Ordering::SeqCst);
                WorkerMessage::Restart(reply)
            }
        };
        send_or_fail(&handle.outbox, message, id);
    }

    fn delete(&mut self, id: &str, reply: Reply<()>) {
        let Some(mut handle) = self.partitions.remove(id) else {
            let _ = reply.send(Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no partition {id:?}"),
            )));
            return;
        };
        handle.shared.interrupt.store(true, Ordering::SeqCst);
        // The worker answers once the partition has stopped; its thread is
        // joined by a helper so that this thread never waits on a guest.
        if handle.outbox.send(WorkerMessage::Delete(reply)).is_err() {
            // The worker is gone already; nothing runs.
        }
        if let Some(thread) = handle.thread.take() {
            let _ = std::thread::Builder::new()
                .name(format!("reap-{id}"))
                .spawn(move || {
                    let _ = thread.join();
                });
        }
    }

    fn swap(&mut self, id: &str, swap: ModelSwap, reply: Reply<PartitionInfo>) {
        let result = (|| {
            let (current, memory_mib) = {
                let handle = self.handle_of(id)?;
                let current = handle.shared.status().plan.clone();
                (current, handle.shared.spec.memory_mib)
            };
            let model = self.models.resolve(&swap.model, "model")?;
            let context_length = swap.context_length.or(Some(current.setup.n_ctx)).map(|n| {
                // Keep the old context, capped by the new model's.
                if model.context_length > 0 {
                    n.min(model.context_length.min(u32::MAX as u64) as u32)
                } else {
                    n
                }
            });
            worker::plan(model, current.host_cpus, memory_mib, current.hugepages, context_length)
        })();
        match result {
            Ok(plan) => {
                let handle = &self.partitions[id];
                send_or_fail(&handle.outbox, WorkerMessage::Swap(Box::new(plan), reply), id);
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
    }

    fn list_models(&self) -> Vec<ModelInfo> {
        let mut models = self.models.list();
        for handle in self.partitions.values() {
            let status = handle.shared.status();
            let name = &status.plan.model.name;
            match models.iter_mut().find(|m| &m.name == name) {
                Some(model) => model.used_by.push(handle.shared.id.clone()),
                None => {
                    let mut model = status.plan.model.clone();
                    model.used_by = vec![handle.shared.id.clone()];
                    models.push(model);
                }
            }
        }
        models
    }

    fn complete(&mut self, job: CompletionJob) -> Result<CompletionStream, ApiError> {
        let id = match &job.target {
            Target::Partition(id) => {
                self.handle_of(id)?;
                id.clone()
            }
            Target::ModelName(name) => self.route(name)?,
        };
        let handle = &self.partitions[&id];
        let (state, model) = {
            let status = handle.shared.status();
            (status.state, status.plan.model.name.clone())
        };
        match state {
            PartitionState::Running | PartitionState::Starting => {}
            PartitionState::Failed => {
                return Err(ApiError::new(
                    ErrorCode::PartitionFailed,
                    format!(
                        "partition {id} has failed ({}); restart it",
                        handle.shared.status().error.as_deref().unwrap_or("no reason recorded")
                    ),
                ))
            }
            other => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("partition {id} is {}; start it first", other.as_str()),
                ))
            }
        }
        let depth = &handle.shared.metrics.queue_depth;
        if depth.load(Ordering::SeqCst) >= MAX_QUEUE {
            return Err(ApiError::new(
                ErrorCode::QueueFull,
                format!("partition {id} already has {MAX_QUEUE} completions queued; retry later"),
            ));
        }
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        depth.fetch_add(1, Ordering::SeqCst);
        if handle
            .outbox
            .send(WorkerMessage::Complete(Box::new(job), events))
            .is_err()
        {
            depth.fetch_sub(1, Ordering::SeqCst);
            return Err(worker_gone(&id));
        }
        Ok(CompletionStream {
            partition: id,
            model,
            events: receiver,
        })
    }

    /// The partition for an OpenAI `model`: a partition of that id, or the
    /// least busy running partition serving a model of that name.
    fn route(&self, name: &str) -> Result<String, ApiError> {
        if self.partitions.contains_key(name) {
            return Ok(name.to_string());
        }
        let serving = self
            .partitions
            .values()
            .filter(|h| {
                let status = h.shared.status();
                status.plan.model.name == name && status.state == PartitionState::Running
            })
            .min_by_key(|h| h.shared.metrics.queue_depth.load(Ordering::SeqCst));
        match serving {
            Some(handle) => Ok(handle.shared.id.clone()),
            None => {
                let running: Vec<String> = self
                    .partitions
                    .values()
                    .filter(|h| h.shared.status().state == PartitionState::Running)
                    .map(|h| format!("{} ({})", h.shared.id, h.shared.status().plan.model.name))
                    .collect();
                Err(ApiError {
                    code: ErrorCode::NotFound,
                    message: format!(
                        "model: no running partition serves {name:?}; running: {} (use a partition id or one of their models; see GET /v1/models)",
                        if running.is_empty() { "none".into() } else { running.join(", ") }
                    ),
                    param: Some("model".into()),
                })
            }
        }
    }

    fn stats(&self) -> Stats {
        Stats {
            uptime_secs: self.started.elapsed().as_secs_f64(),
            partitions: self
                .partitions
                .values()
                .map(|handle| {
                    let snapshot = handle.shared.metrics.snapshot();
                    let status = handle.shared.status();
                    PartitionStats {
                        id: handle.shared.id.clone(),
                        state: status.state,
                        model: status.plan.model.name.clone(),
                        counters: snapshot.counters,
                        tokens_per_sec: snapshot.tokens_per_sec,
                        jitter_ms: snapshot.token_latency_ms.p99 - snapshot.token_latency_ms.p50,
                        ttft_ms: snapshot.ttft_ms,
                        token_latency_ms: snapshot.token_latency_ms,
                        guest_memory_bytes: handle
                            .shared
                            .metrics
                            .guest_memory_bytes
                            .load(Ordering::Relaxed),
                    }
                })
                .collect(),
        }
    }

    fn metrics(&self) -> String {
        let statuses: Vec<(PartitionState, String)> = self
            .partitions
            .values()
            .map(|h| {
                let status = h.shared.status();
                (status.state, status.plan.model.name.clone())
            })
            .collect();
        let rows: Vec<MetricsRow<'_>> = self
            .partitions
            .values()
            .zip(&statuses)
            .map(|(handle, (state, model))| MetricsRow {
                id: &handle.shared.id,
                model,
                state: *state,
                metrics: &handle.shared.metrics,
            })
            .collect();
        metrics::render(self.started.elapsed().as_secs_f64(), &rows)
    }
}

fn worker_gone(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("the worker of partition {id} has ended; delete and create the partition again"),
    )
}

/// Hands `message` to a worker; if the worker is gone, answers its reply.
fn send_or_fail(outbox: &mpsc::Sender<WorkerMessage>, message: WorkerMessage, id: &str) {
    if let Err(mpsc::SendError(message)) = outbox.send(message) {
        match message {
            WorkerMessage::Start(Some(reply))
            | WorkerMessage::Stop(reply)
            | WorkerMessage::Restart(reply)
            | WorkerMessage::Swap(_, reply)
            | WorkerMessage::SwapReady(_, _, reply) => {
                let _ = reply.send(Err(worker_gone(id)));
            }
            WorkerMessage::Delete(reply) => {
                let _ = reply.send(Ok(()));
            }
            WorkerMessage::Complete(_, events) => {
                let _ = events.send(aivmm_api::request::StreamEvent::Error(worker_gone(id)));
            }
            WorkerMessage::Start(None) => {}
        }
    }
}
