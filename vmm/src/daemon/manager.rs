//! The partition manager: the daemon's one owner of partitions and models.
//! It takes the API's typed requests one at a time on its own thread, checks
//! them against what exists, and hands each partition's work to that
//! partition's worker; nothing slow (a boot, a completion) runs here, so
//! listing and telemetry answer at once while partitions boot or generate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

use super::devices::DeviceClaims;
use super::linux;
use super::metrics::{self, MetricsRow};
use super::models::{self, ModelRegistry};
use super::state::{self, SavedPartition, SavedState, StateError};
use super::worker::{self, Plan, Shared, Worker, WorkerMessage};
use crate::host::{HugepageSize, Placement, PlacementError, PlacementRequest, Placer};

/// Completions a partition holds (running and waiting) before it answers
/// `queue_full`.
pub const MAX_QUEUE: u64 = 64;

struct Handle {
    shared: Arc<Shared>,
    outbox: mpsc::Sender<WorkerMessage>,
    thread: Option<JoinHandle<()>>,
    /// Started through the API and not stopped since: what a restart of the
    /// daemon brings back.
    wants_running: bool,
}

pub struct Manager {
    partitions: BTreeMap<String, Handle>,
    models: ModelRegistry,
    started: Instant,
    placer: Placer,
    /// Deleted partitions whose worker has not yet stopped them: their CPUs
    /// and memory stay taken until it has.
    deleting: Vec<Arc<Shared>>,
    /// Where the partitions are saved after every change (None: nowhere).
    state_file: Option<PathBuf>,
    /// What the state file holds (None: unknown, write it).
    last_saved: Option<SavedState>,
    /// Host PCI devices held by partitions.
    devices: DeviceClaims,
    /// Where Linux partitions' console logs go: beside the state file.
    console_dir: PathBuf,
}

impl Manager {
    /// A manager placing partitions with `placer`. With a state file, the
    /// partitions saved there are restored: those whose model, CPUs, node and
    /// memory are still there come back (booted again if they were running);
    /// the others are skipped, with the reason on stderr.
    pub fn new(
        models: ModelRegistry,
        placer: Placer,
        devices: DeviceClaims,
        state_file: Option<PathBuf>,
    ) -> Result<Manager, StateError> {
        let saved = match &state_file {
            Some(path) => state::load(path)?,
            None => None,
        };
        let console_dir = match &state_file {
            Some(path) => state::console_dir(path),
            None => std::env::temp_dir().join(format!("aivmm-console-{}", std::process::id())),
        };
        let mut manager = Manager {
            partitions: BTreeMap::new(),
            models,
            started: Instant::now(),
            placer,
            deleting: Vec::new(),
            state_file,
            last_saved: None,
            devices,
            console_dir,
        };
        if let Some(saved) = saved {
            for partition in saved.partitions {
                let id = partition.spec.id.clone();
                match manager.restore(&partition) {
                    Ok(()) => eprintln!(
                        "aivmm serve: restored partition {id} on host CPUs {:?}{}",
                        partition.placement.host_cpus,
                        if partition.running {
                            ", booting it"
                        } else {
                            ""
                        }
                    ),
                    Err(why) => eprintln!(
                        "aivmm serve: not restoring partition {id}: {why} (it was {})",
                        serde_json::to_string(&partition).unwrap_or_default()
                    ),
                }
            }
            manager.save();
        }
        Ok(manager)
    }

    /// Brings back one saved partition, or says why it cannot be.
    fn restore(&mut self, saved: &SavedPartition) -> Result<(), String> {
        let id = &saved.spec.id;
        validate_partition_id(id)?;
        if self.partitions.contains_key(id) {
            return Err("the state file has it twice".into());
        }
        if let Some(spec) = &saved.spec.linux {
            let plan = linux::plan(
                spec,
                &saved.spec.devices,
                saved.placement.host_cpus.len() as u32,
                saved.spec.memory_mib,
                saved.spec.hugepages,
                self.console_log(id).map_err(|error| error.message)?,
            )
            .map_err(|error| error.message)?;
            self.placer.restore(id, &saved.placement)?;
            if let Err(error) = self.devices.claim(
                id,
                &plan.devices,
                plan.memory_bytes,
                Some(saved.placement.node),
            ) {
                let _ = self.placer.release(id);
                return Err(error.message);
            }
            let mut plan = Plan::Linux(plan);
            plan.place(saved.placement.host_cpus.clone(), saved.placement.node);
            if let Err(error) = self.spawn(saved.spec.clone(), plan, saved.running, None) {
                self.forget(id);
                return Err(error.message);
            }
            return Ok(());
        }
        let model = models::describe(&saved.model_name, Path::new(&saved.model_path))
            .map_err(|error| error.message)?;
        let plan = worker::plan(
            model,
            saved.placement.host_cpus.len() as u32,
            saved.spec.memory_mib,
            saved.spec.hugepages,
            Some(saved.context_length),
        )
        .map_err(|error| error.message)?;
        self.placer.restore(id, &saved.placement)?;
        if plan.memory_bytes != saved.placement.memory_bytes {
            // This daemon sizes the model differently from the one that saved it.
            if let Err(error) = self.placer.resize_memory(id, plan.memory_bytes) {
                let _ = self.placer.release(id);
                return Err(error.to_string());
            }
        }
        let mut plan = Plan::Inference(plan);
        plan.place(saved.placement.host_cpus.clone(), saved.placement.node);
        if let Err(error) = self.spawn(saved.spec.clone(), plan, saved.running, None) {
            let _ = self.placer.release(id);
            return Err(error.message);
        }
        Ok(())
    }

    /// What the state file holds now.
    fn saved_state(&self) -> SavedState {
        let partitions = self
            .partitions
            .iter()
            .filter_map(|(id, handle)| {
                let placement = self.placer.allocations().get(id)?.clone();
                let status = handle.shared.status();
                let (model_name, model_path, context_length) = match &status.plan {
                    Plan::Inference(plan) => (
                        plan.model.name.clone(),
                        plan.model.path.clone(),
                        plan.setup.n_ctx,
                    ),
                    Plan::Linux(_) => (String::new(), String::new(), 0),
                };
                Some(SavedPartition {
                    spec: handle.shared.spec.clone(),
                    model_name,
                    model_path,
                    context_length,
                    placement,
                    running: handle.wants_running,
                })
            })
            .collect();
        SavedState {
            version: state::VERSION,
            partitions,
        }
    }

    /// Saves the partitions if they changed since the last save (a finished
    /// model swap counts); a failure is reported, and the next call tries
    /// again.
    fn save(&mut self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let state = self.saved_state();
        if self.last_saved.as_ref() == Some(&state) {
            return;
        }
        match state::save(path, &state) {
            Ok(()) => self.last_saved = Some(state),
            Err(error) => {
                let cause = std::error::Error::source(&error)
                    .map(|source| format!(": {source}"))
                    .unwrap_or_default();
                eprintln!("aivmm serve: {error}{cause}");
            }
        }
    }

    /// Frees what a partition that never ran, or has stopped for good, holds.
    fn forget(&mut self, id: &str) {
        let _ = self.placer.release(id);
        self.devices.release(id);
    }

    /// Where the console of Linux partition `id` goes (the directory is made here).
    fn console_log(&self, id: &str) -> Result<PathBuf, ApiError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.console_dir)
            .map_err(|error| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "cannot create the console log directory {}: {error}",
                        self.console_dir.display()
                    ),
                )
            })?;
        Ok(self.console_dir.join(format!("{id}.log")))
    }

    /// Frees the placements and devices of deleted partitions whose worker
    /// has stopped them.
    fn reap(&mut self) {
        let placer = &mut self.placer;
        let devices = &mut self.devices;
        self.deleting.retain(|shared| {
            if shared.ended.load(Ordering::SeqCst) {
                let _ = placer.release(&shared.id);
                devices.release(&shared.id);
                false
            } else {
                true
            }
        });
    }

    /// Serves requests until every sender is gone, then stops every partition.
    pub fn run(mut self, mut requests: UnboundedReceiver<ApiRequest>) {
        while let Some(request) = requests.blocking_recv() {
            self.handle(request);
            self.save();
        }
        self.shutdown();
    }

    /// Stops every partition and waits for their workers. The state file
    /// keeps them (with the model each serves now), for the next start.
    pub fn shutdown(&mut self) {
        self.save();
        self.state_file = None;
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
            ApiRequest::Console(id, bytes, reply) => {
                let _ = reply.send(self.console(&id, bytes));
            }
            ApiRequest::ListDevices(reply) => {
                self.reap();
                let _ = reply.send(self.devices.list());
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
        self.partitions
            .get(id)
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no partition {id:?}")))
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

    fn create(&mut self, spec: PartitionSpec, reply: Reply<PartitionInfo>) {
        self.reap();
        let result = (|| {
            validate_partition_id(&spec.id).map_err(|why| ApiError::invalid("id", why))?;
            if self.partitions.contains_key(&spec.id) {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("partition {} already exists", spec.id),
                ));
            }
            if self.deleting.iter().any(|shared| shared.id == spec.id) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "partition {} is still being deleted; retry in a moment",
                        spec.id
                    ),
                ));
            }
            let vcpus = match &spec.cores {
                Some(cores) => cores.len() as u32,
                None => spec.vcpus.unwrap_or(1),
            };
            if let Some(linux) = &spec.linux {
                return self.create_linux(&spec, linux, vcpus);
            }
            if !spec.devices.is_empty() {
                return Err(ApiError::invalid(
                    "devices",
                    "only Linux partitions take PCI devices (give `linux` instead of `model`)",
                ));
            }
            let param = if spec.cores.is_some() {
                "cores"
            } else {
                "vcpus"
            };
            if vcpus == 0 || vcpus > aivmm_guest_abi::MAX_VCPUS {
                return Err(ApiError::invalid(
                    param,
                    format!("must be 1 to {} vCPUs", aivmm_guest_abi::MAX_VCPUS),
                ));
            }
            let Some(model) = &spec.model else {
                return Err(ApiError::invalid(
                    "model",
                    "give `model` (a model name or GGUF file) or `linux` (a kernel to boot)",
                ));
            };
            let model = self.models.resolve(model, "model")?;
            let plan = worker::plan(
                model,
                vcpus,
                spec.memory_mib,
                spec.hugepages,
                spec.context_length,
            )?;
            let placement = self.place(&spec, vcpus, plan.memory_bytes, spec.numa_node)?;
            let mut plan = Plan::Inference(plan);
            plan.place(placement.host_cpus, placement.node);
            Ok(plan)
        })();
        let plan = match result {
            Ok(plan) => plan,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        let id = spec.id.clone();
        let start = spec.start;
        match self.spawn(spec, plan, start, Some(reply)) {
            Ok(()) => self.save(),
            Err(_) => {
                // spawn answered the reply.
                self.forget(&id);
            }
        }
    }

    /// Places `spec`'s cores (`vcpus` of them unless it names its cores) and
    /// `memory_bytes` of RAM, on `numa_node` if given.
    fn place(
        &mut self,
        spec: &PartitionSpec,
        vcpus: u32,
        memory_bytes: u64,
        numa_node: Option<u32>,
    ) -> Result<Placement, ApiError> {
        if spec.hugepages {
            if let Err(error) = self.placer.refresh_hugepages() {
                eprintln!("aivmm serve: cannot read the hugepage pools again ({error}); placing with the counts read before");
            }
        }
        let request = PlacementRequest {
            vcpus: if spec.cores.is_some() {
                spec.vcpus
            } else {
                Some(vcpus)
            },
            cores: spec.cores.clone(),
            memory_bytes,
            hugepages: spec.hugepages.then_some(HugepageSize::TwoMiB),
            numa_node,
        };
        self.placer
            .place(&spec.id, &request)
            .map_err(|error| placement_error(&spec.id, error))
    }

    /// Checks, places and claims the devices of a Linux partition, all or
    /// nothing: placement first (on the node of its devices unless the spec
    /// names one), then the devices.
    fn create_linux(
        &mut self,
        spec: &PartitionSpec,
        linux: &LinuxSpec,
        vcpus: u32,
    ) -> Result<Plan, ApiError> {
        // Before the plan's own lock probe: a disk of another partition
        // here is named with its holder.
        self.check_disks_free(&spec.id, linux)?;
        let plan = linux::plan(
            linux,
            &spec.devices,
            vcpus,
            spec.memory_mib,
            spec.hugepages,
            self.console_log(&spec.id)?,
        )?;
        // Before placement, so that a held device is named even when the
        // cores are taken too.
        self.devices.check_free(&spec.id, &plan.devices)?;
        let numa_node = spec.numa_node.or_else(|| {
            plan.devices
                .iter()
                .find_map(|bdf| self.devices.node_of(bdf))
                .filter(|node| self.placer.topology().node(*node).is_some())
        });
        let placement = self.place(spec, vcpus, plan.memory_bytes, numa_node)?;
        if let Err(error) = self.devices.claim(
            &spec.id,
            &plan.devices,
            plan.memory_bytes,
            Some(placement.node),
        ) {
            let _ = self.placer.release(&spec.id);
            return Err(error);
        }
        let mut plan = Plan::Linux(plan);
        plan.place(placement.host_cpus, placement.node);
        Ok(plan)
    }

    /// No disk of `linux` is another partition's, unless both attach it
    /// read-only (the locks the boots take would refuse it then, or later).
    fn check_disks_free(&self, id: &str, linux: &LinuxSpec) -> Result<(), ApiError> {
        for disk in &linux.disks {
            // A path that does not resolve is the plan's error to report.
            let Ok(path) = Path::new(&disk.path).canonicalize() else {
                continue;
            };
            for (holder, handle) in &self.partitions {
                if holder == id {
                    continue;
                }
                let status = handle.shared.status();
                let Plan::Linux(plan) = &status.plan else {
                    continue;
                };
                if let Some(held) = plan.disks.iter().find(|held| held.path == path) {
                    if held.read_only && disk.read_only {
                        continue;
                    }
                    return Err(ApiError {
                        code: ErrorCode::Conflict,
                        message: format!(
                            "linux.disks: {} is a disk of partition {holder} ({}); delete that partition, or attach the disk read-only in both",
                            path.display(),
                            if held.read_only { "read-only" } else { "writable" }
                        ),
                        param: Some("linux.disks".into()),
                    });
                }
            }
        }
        Ok(())
    }

    fn console(&self, id: &str, bytes: u64) -> Result<ConsoleTail, ApiError> {
        let handle = self.handle_of(id)?;
        match &handle.shared.status().plan {
            Plan::Linux(plan) => linux::console_tail(id, &plan.console_log, bytes),
            Plan::Inference(_) => Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "partition {id} is an inference partition: only Linux partitions have a serial console log"
                ),
            )),
        }
    }

    /// Starts the worker of a placed partition, and boots it if `start`.
    /// Answers `reply` (once booted, when starting); on an error, answers it
    /// with the error too.
    fn spawn(
        &mut self,
        spec: PartitionSpec,
        plan: Plan,
        start: bool,
        reply: Option<Reply<PartitionInfo>>,
    ) -> Result<(), ApiError> {
        let (outbox, inbox) = mpsc::channel();
        let (worker, shared) =
            Worker::new(spec.id.clone(), spec.clone(), plan, inbox, outbox.clone());
        let thread = match std::thread::Builder::new()
            .name(format!("partition-{}", spec.id))
            .spawn(move || worker.run())
        {
            Ok(thread) => thread,
            Err(error) => {
                let error = ApiError::new(
                    ErrorCode::Internal,
                    format!("cannot start the partition's thread: {error}"),
                );
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error.clone()));
                }
                return Err(error);
            }
        };
        self.partitions.insert(
            spec.id.clone(),
            Handle {
                shared: shared.clone(),
                outbox: outbox.clone(),
                thread: Some(thread),
                wants_running: start,
            },
        );
        if start {
            shared.status().state = PartitionState::Starting;
            if let Err(mpsc::SendError(WorkerMessage::Start(Some(reply)))) =
                outbox.send(WorkerMessage::Start(reply))
            {
                let _ = reply.send(Err(worker_gone(&spec.id)));
            }
        } else if let Some(reply) = reply {
            let _ = reply.send(Ok(shared.info()));
        }
        Ok(())
    }

    fn action(&mut self, id: &str, action: PartitionAction, reply: Reply<PartitionInfo>) {
        let Some(handle) = self.partitions.get_mut(id) else {
            let _ = reply.send(Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no partition {id:?}"),
            )));
            return;
        };
        let wants_running = action != PartitionAction::Stop;
        let changed = handle.wants_running != wants_running;
        handle.wants_running = wants_running;
        let handle = &self.partitions[id];
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
        if changed {
            self.save();
        }
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
        self.deleting.push(handle.shared.clone());
        self.save();
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
        self.reap();
        let result = (|| {
            let (current, memory_mib) = {
                let handle = self.handle_of(id)?;
                let current = match &handle.shared.status().plan {
                    Plan::Inference(plan) => plan.clone(),
                    Plan::Linux(_) => return Err(worker::linux_has_no_model(id)),
                };
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
            let mut plan = worker::plan(
                model,
                current.vcpus,
                memory_mib,
                current.hugepages,
                context_length,
            )?;
            // The new model's memory, on the partition's node and CPUs.
            let placement = self
                .placer
                .resize_memory(id, plan.memory_bytes)
                .map_err(|error| placement_error(id, error))?;
            plan.host_cpus = placement.host_cpus;
            plan.numa_node = Some(placement.node);
            Ok(plan)
        })();
        match result {
            Ok(plan) => {
                let handle = &self.partitions[id];
                send_or_fail(
                    &handle.outbox,
                    WorkerMessage::Swap(Box::new(plan), reply),
                    id,
                );
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
            let Some(served) = status.plan.model() else {
                continue;
            };
            match models.iter_mut().find(|m| m.name == served.name) {
                Some(model) => model.used_by.push(handle.shared.id.clone()),
                None => {
                    let mut model = served.clone();
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
            match status.plan.model() {
                Some(model) => (status.state, model.name.clone()),
                None => return Err(worker::linux_has_no_model(&id)),
            }
        };
        match state {
            PartitionState::Running | PartitionState::Starting => {}
            PartitionState::Failed => {
                return Err(ApiError::new(
                    ErrorCode::PartitionFailed,
                    format!(
                        "partition {id} has failed ({}); restart it",
                        handle
                            .shared
                            .status()
                            .error
                            .as_deref()
                            .unwrap_or("no reason recorded")
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
                status.plan.model_name() == name && status.state == PartitionState::Running
            })
            .min_by_key(|h| h.shared.metrics.queue_depth.load(Ordering::SeqCst));
        match serving {
            Some(handle) => Ok(handle.shared.id.clone()),
            None => {
                let running: Vec<String> = self
                    .partitions
                    .values()
                    .filter(|h| h.shared.status().state == PartitionState::Running)
                    .filter_map(|h| {
                        let status = h.shared.status();
                        let model = status.plan.model()?;
                        Some(format!("{} ({})", h.shared.id, model.name))
                    })
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
                        model: status.plan.model_name().to_string(),
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
                (status.state, status.plan.model_name().to_string())
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

/// A refusal of the placer as the API says it: `resources_exhausted` when
/// what was asked for is taken, `invalid_request` on the field at fault when
/// it cannot exist on this host.
fn placement_error(id: &str, error: PlacementError) -> ApiError {
    if error.is_exhaustion() {
        let hint = match &error {
            PlacementError::OutOfCores(_) => "delete a partition or ask for fewer vCPUs",
            PlacementError::OutOfMemory(why) if why.contains("hugepages") => {
                "delete a partition, ask for less memory, or reserve more hugepages on the node \
                 (/sys/devices/system/node/nodeN/hugepages/hugepages-2048kB/nr_hugepages)"
            }
            PlacementError::OutOfMemory(_) => "delete a partition or ask for less memory",
            _ => "pick other cores, or leave out `cores` to let the daemon choose",
        };
        return ApiError::new(
            ErrorCode::ResourcesExhausted,
            format!("cannot place partition {id}: {error}; {hint}"),
        );
    }
    let param = match &error {
        PlacementError::NoSuchNode { .. } | PlacementError::CpuOffNode { .. } => "numa_node",
        PlacementError::ZeroMemory => "memory_mib",
        PlacementError::ZeroVcpus | PlacementError::NoCpusRequested => "vcpus",
        PlacementError::NoSuchCpu { .. }
        | PlacementError::CpuOffline { .. }
        | PlacementError::CpuExcluded { .. }
        | PlacementError::DuplicateCpu(_)
        | PlacementError::VcpuCountMismatch { .. } => "cores",
        PlacementError::EmptyPartitionId => "id",
        _ => return ApiError::new(ErrorCode::Internal, error.to_string()),
    };
    ApiError::invalid(param, error.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Topology;

    // These tests create partitions without starting them: no KVM needed.
    use crate::daemon::Scratch;

    fn placer(fixture: &str) -> Placer {
        Placer::new(Topology::discover(&crate::host::fixture(fixture)).unwrap())
    }

    fn manager(model: &Path, placer: Placer, state: &Path) -> Manager {
        let models = ModelRegistry::new(None, &[("tiny".into(), model.into())]);
        let devices = DeviceClaims::new(placer.topology().root.clone());
        Manager::new(models, placer, devices, Some(state.into())).unwrap()
    }

    fn spec(id: &str, extra: &str) -> PartitionSpec {
        serde_json::from_str(&format!(
            r#"{{"id": "{id}", "model": "tiny", "start": false{extra}}}"#
        ))
        .unwrap()
    }

    fn create(manager: &mut Manager, spec: PartitionSpec) -> Result<PartitionInfo, ApiError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        manager.create(spec, reply);
        answer.blocking_recv().unwrap()
    }

    fn delete(manager: &mut Manager, id: &str) -> Result<(), ApiError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        manager.delete(id, reply);
        answer.blocking_recv().unwrap()
    }

    fn placed(manager: &Manager) -> Vec<(String, Vec<usize>)> {
        manager
            .partitions
            .values()
            .map(|handle| {
                let info = handle.shared.info();
                (info.id, info.host_cpus)
            })
            .collect()
    }

    fn saved(path: &Path) -> Vec<(String, Vec<usize>)> {
        state::load(path)
            .unwrap()
            .unwrap()
            .partitions
            .into_iter()
            .map(|p| (p.spec.id, p.placement.host_cpus))
            .collect()
    }

    fn pair(id: &str, cpu: usize) -> (String, Vec<usize>) {
        (id.to_string(), vec![cpu])
    }

    #[test]
    fn partitions_are_placed_refused_freed_saved_and_restored() {
        let scratch = Scratch::new("lifecycle");
        let model = scratch.0.join("tiny.gguf");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny-llama-q8_0.gguf");
        std::fs::copy(&fixture, &model).unwrap();
        let state_file = scratch.0.join("aivmm.state.json");

        // The two cores of this machine: one partition each, a third refused.
        let mut m = manager(&model, placer("this-machine"), &state_file);
        let a = create(&mut m, spec("a", "")).unwrap();
        assert_eq!(
            (a.host_cpus, a.numa_node, a.state, a.kind),
            (
                vec![0],
                Some(0),
                PartitionState::Stopped,
                PartitionKind::Inference
            )
        );
        let error = m.console("a", 100).unwrap_err();
        assert_eq!(error.code, ErrorCode::Conflict);
        assert!(error.message.contains("only Linux partitions"), "{error}");
        let error = create(&mut m, spec("b", r#", "hugepages": true"#)).unwrap_err();
        assert_eq!(error.code, ErrorCode::ResourcesExhausted);
        assert!(
            error
                .message
                .contains("not enough 2 MiB hugepages on NUMA node 0: 0 free"),
            "{error}"
        );
        assert_eq!(create(&mut m, spec("b", "")).unwrap().host_cpus, vec![1]);
        let error = create(&mut m, spec("c", "")).unwrap_err();
        assert_eq!(error.code, ErrorCode::ResourcesExhausted);
        assert!(error.message.contains("not enough free cores"), "{error}");
        let error = create(&mut m, spec("c", r#", "cores": [5]"#)).unwrap_err();
        assert_eq!(
            (error.code, error.param.as_deref()),
            (ErrorCode::InvalidRequest, Some("cores"))
        );
        assert!(
            error.message.contains("host CPU 5 does not exist"),
            "{error}"
        );
        let error = create(&mut m, spec("c", r#", "numa_node": 2"#)).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("numa_node"));
        assert_eq!(saved(&state_file), vec![pair("a", 0), pair("b", 1)]);

        // Deleting frees the core for the next partition.
        delete(&mut m, "b").unwrap();
        assert_eq!(saved(&state_file), vec![pair("a", 0)]);
        assert_eq!(
            create(&mut m, spec("c", r#", "cores": [1]"#))
                .unwrap()
                .host_cpus,
            vec![1]
        );
        assert_eq!(saved(&state_file), vec![pair("a", 0), pair("c", 1)]);
        drop(m);

        // A restart brings them back on the same CPUs, still refusing a third.
        let mut m = manager(&model, placer("this-machine"), &state_file);
        assert_eq!(placed(&m), vec![pair("a", 0), pair("c", 1)]);
        assert_eq!(
            create(&mut m, spec("d", "")).unwrap_err().code,
            ErrorCode::ResourcesExhausted
        );
        drop(m);

        // A partition whose CPU the host now keeps is skipped (and forgotten).
        let mut kept = placer("this-machine");
        kept.reserve_for_host(&[0]).unwrap();
        let m = manager(&model, kept, &state_file);
        assert_eq!(placed(&m), vec![pair("c", 1)]);
        assert_eq!(saved(&state_file), vec![pair("c", 1)]);
        drop(m);

        // So is one whose model file is gone.
        std::fs::remove_file(&model).unwrap();
        let m = manager(&model, placer("this-machine"), &state_file);
        assert!(placed(&m).is_empty());
        assert!(saved(&state_file).is_empty());
    }

    /// The two-socket fixture made ready for passthrough of 0000:ca:00.0
    /// (node 1, IOMMU group 70, on vfio-pci, /dev/vfio/70 there); 0000:17:00.0
    /// is on vfio-pci too but its group's /dev/vfio node is missing.
    fn passthrough_host(test: &str) -> crate::host::Scratch {
        use std::os::unix::fs::symlink;
        let host = crate::host::Scratch::of("two-socket-smt", test);
        let sys = host.0.join("sys");
        std::fs::create_dir_all(sys.join("bus/pci/drivers/vfio-pci")).unwrap();
        symlink(
            "../../../bus/pci/drivers/vfio-pci",
            sys.join("bus/pci/devices/0000:ca:00.0/driver"),
        )
        .unwrap();
        for (group, device) in [(70, "0000:ca:00.0"), (21, "0000:17:00.0")] {
            let members = sys.join(format!("kernel/iommu_groups/{group}/devices"));
            std::fs::create_dir_all(&members).unwrap();
            symlink(
                sys.join("bus/pci/devices").join(device),
                members.join(device),
            )
            .unwrap();
        }
        std::fs::create_dir_all(host.0.join("dev/vfio")).unwrap();
        std::fs::write(host.0.join("dev/vfio/70"), "").unwrap();
        host
    }

    fn linux_manager(root: &Path, state: &Path) -> Manager {
        let limits = aivmm_passthrough::preflight::ProcessLimits {
            memlock_bytes: None,
            cap_ipc_lock: false,
        };
        let placer = Placer::new(Topology::discover(root).unwrap());
        let devices = DeviceClaims::with_limits(root.into(), limits);
        Manager::new(
            ModelRegistry::new(None, &[]),
            placer,
            devices,
            Some(state.into()),
        )
        .unwrap()
    }

    fn linux_spec(id: &str, kernel: &Path, devices: &[&str]) -> PartitionSpec {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "linux": { "kernel": kernel },
            "devices": devices,
            "start": false,
        }))
        .unwrap()
    }

    fn owners(manager: &Manager) -> Vec<(String, Option<String>)> {
        manager
            .devices
            .list()
            .unwrap()
            .into_iter()
            .map(|d| (d.address, d.owner))
            .collect()
    }

    #[test]
    fn one_device_belongs_to_one_partition_and_claims_survive_a_restart() {
        let host = passthrough_host("claims");
        let scratch = Scratch::new("claims");
        let kernel = scratch.0.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF\x02\x01\x01\x00").unwrap();
        let state_file = scratch.0.join("aivmm.state.json");
        let gpu = "0000:ca:00.0";

        let mut m = linux_manager(&host.0, &state_file);
        let a = create(&mut m, linux_spec("a", &kernel, &[gpu])).unwrap();
        assert_eq!(a.kind, PartitionKind::Linux);
        assert_eq!(a.devices, vec![gpu.to_string()]);
        // Placed next to the device.
        assert_eq!(a.numa_node, Some(1));
        assert_eq!(
            a.linux.as_ref().unwrap().kernel,
            kernel.display().to_string()
        );

        // A second partition asking for it is refused, naming the holder,
        // and keeps nothing.
        let error = create(&mut m, linux_spec("b", &kernel, &[gpu])).unwrap_err();
        assert_eq!(
            (error.code, error.param.as_deref()),
            (ErrorCode::Conflict, Some("devices"))
        );
        assert!(error.message.contains("belongs to partition a"), "{error}");
        assert!(!m.placer.allocations().contains_key("b"));

        // A device that fails the preflight: the preflight's message, and
        // the placement is given back.
        let error = create(&mut m, linux_spec("c", &kernel, &["0000:17:00.0"])).unwrap_err();
        assert_eq!(
            (error.code, error.param.as_deref()),
            (ErrorCode::InvalidRequest, Some("devices"))
        );
        assert!(error.message.contains("load the VFIO modules"), "{error}");
        assert!(!m.placer.allocations().contains_key("c"));
        // All or nothing: the free device is not kept when another fails.
        let error = create(&mut m, linux_spec("c", &kernel, &["0000:17:00.0", gpu])).unwrap_err();
        assert_eq!(error.code, ErrorCode::Conflict);

        // Inference partitions take no devices.
        let mut model_spec = linux_spec("d", &kernel, &[gpu]);
        model_spec.linux = None;
        model_spec.model = Some("tiny".into());
        let error = create(&mut m, model_spec).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("devices"));

        let listed = owners(&m);
        assert!(
            listed.contains(&(gpu.into(), Some("a".into()))),
            "{listed:?}"
        );
        assert!(
            listed.contains(&("0000:17:00.0".into(), None)),
            "{listed:?}"
        );
        drop(m);

        // A restarted daemon holds the claim again.
        let mut m = linux_manager(&host.0, &state_file);
        assert_eq!(m.devices.holder(&gpu.parse().unwrap()), Some("a"));
        let restored = m.partitions["a"].shared.info();
        assert_eq!(
            (restored.kind, restored.devices),
            (PartitionKind::Linux, vec![gpu.to_string()])
        );
        let error = create(&mut m, linux_spec("b", &kernel, &[gpu])).unwrap_err();
        assert_eq!(error.code, ErrorCode::Conflict);

        // Deleting releases it for the next partition.
        delete(&mut m, "a").unwrap();
        let b = create(&mut m, linux_spec("b", &kernel, &[gpu])).unwrap();
        assert_eq!(b.devices, vec![gpu.to_string()]);
        assert!(owners(&m).contains(&(gpu.into(), Some("b".into()))));
        drop(m);

        // This machine has no IOMMU: the preflight says what to enable.
        let this = crate::host::fixture("this-machine");
        let mut m = linux_manager(&this, &scratch.0.join("other.state.json"));
        let error = create(&mut m, linux_spec("e", &kernel, &["0000:00:03.0"])).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("devices"));
        assert!(
            error.message.contains("the IOMMU is not enabled"),
            "{error}"
        );
        assert!(m.partitions.is_empty() && m.placer.allocations().is_empty());
    }

    #[test]
    fn linux_partitions_refuse_model_operations() {
        let scratch = Scratch::new("linux-refusals");
        let kernel = scratch.0.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF\x02\x01\x01\x00").unwrap();
        let this = crate::host::fixture("this-machine");
        let mut m = linux_manager(&this, &scratch.0.join("aivmm.state.json"));
        create(&mut m, linux_spec("l", &kernel, &[])).unwrap();
        let error = m.console("l", 100).unwrap();
        assert_eq!((error.size_bytes, error.text.as_str()), (0, ""));

        let (reply, answer) = tokio::sync::oneshot::channel();
        m.swap(
            "l",
            ModelSwap {
                model: "tiny".into(),
                context_length: None,
            },
            reply,
        );
        let error = answer.blocking_recv().unwrap().unwrap_err();
        assert_eq!(error.code, ErrorCode::Conflict);
        assert!(error.message.contains("runs a Linux guest"), "{error}");
        assert!(m.list_models().is_empty());

        let script = scratch.0.join("script.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let error = create(&mut m, linux_spec("x", &script, &[])).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("linux.kernel"));
        assert!(
            error
                .message
                .contains("script.sh is not a Linux kernel image"),
            "{error}"
        );
        // Its one core is still free for the next one.
        assert_eq!(
            create(&mut m, linux_spec("y", &kernel, &[]))
                .unwrap()
                .host_cpus,
            vec![1]
        );
    }

    #[test]
    fn a_corrupt_state_file_stops_the_daemon_instead_of_being_overwritten() {
        let scratch = Scratch::new("corrupt");
        let state_file = scratch.0.join("aivmm.state.json");
        std::fs::write(&state_file, "{not json").unwrap();
        let models = ModelRegistry::new(None, &[]);
        let devices = DeviceClaims::new(crate::host::fixture("this-machine"));
        let error = Manager::new(
            models,
            placer("this-machine"),
            devices,
            Some(state_file.clone()),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(error.contains("aivmm.state.json is not valid"), "{error}");
        assert_eq!(std::fs::read_to_string(&state_file).unwrap(), "{not json");
    }
}
