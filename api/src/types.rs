//! The resources of the API, one serde type each, shared by the server, the
//! daemon behind it and the client. Requests reject unknown fields; every
//! type here has a schema of the same name in `api/openapi.yaml`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `POST /partitions`: what a new partition gets and runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    /// Name of the partition: 1 to 63 characters of `a-z 0-9 - _`, starting
    /// with a letter or digit.
    pub id: String,
    /// Model: a name from `GET /models`, or the absolute path of a GGUF file
    /// (an inference partition). Give either `model` or `linux`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Boot this Linux guest instead of a model (a Linux partition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux: Option<LinuxSpec>,
    /// Host PCI devices passed through to the partition (Linux partitions
    /// only), e.g. "0000:17:00.0". One device belongs to one partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Number of vCPUs; each gets a whole host core of its own (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Explicit host CPUs, one per vCPU (instead of letting the daemon pick).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<Vec<usize>>,
    /// Guest memory in MiB (default: what the model and context need).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Back guest memory with 2 MiB hugepages.
    #[serde(default)]
    pub hugepages: bool,
    /// NUMA node for the cores and memory (default: the daemon picks one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Context length in tokens (default: 4096 or the model's, if smaller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
    /// Boot it now (default) or leave it stopped.
    #[serde(default = "yes")]
    pub start: bool,
}

fn yes() -> bool {
    true
}

/// What a Linux partition boots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinuxSpec {
    /// Absolute path of the kernel: a vmlinux ELF or a bzImage.
    pub kernel: String,
    /// Absolute path of an initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line (default: the serial console on ttyS0, no PCI probing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub boot_protocol: BootProtocol,
    /// virtio-blk disks (/dev/vda, /dev/vdb, ... in the guest): image
    /// files or block devices, locked while the partition runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<LinuxDisk>,
}

/// One disk of a Linux partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinuxDisk {
    /// Absolute path of a disk image (a regular file) or a block device.
    pub path: String,
    /// Attach it read-only (a shared lock: other partitions may read it too).
    #[serde(default)]
    pub read_only: bool,
}

/// Entry point of a Linux kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BootProtocol {
    /// PVH if the kernel has the ELF note, else the 64-bit boot protocol.
    #[default]
    Auto,
    /// The 64-bit boot protocol (zero page).
    Linux64,
    /// PVH (a vmlinux with the PVH note only).
    Pvh,
}

/// What a partition runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PartitionKind {
    /// The inference kernel serving a model.
    Inference,
    /// A Linux guest.
    Linux,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PartitionState {
    Stopped,
    Starting,
    Running,
    Stopping,
    /// The guest or its boot failed; `error` says why. Start it again, or
    /// delete it.
    Failed,
}

impl PartitionState {
    pub const ALL: [PartitionState; 5] = [
        PartitionState::Stopped,
        PartitionState::Starting,
        PartitionState::Running,
        PartitionState::Stopping,
        PartitionState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PartitionState::Stopped => "stopped",
            PartitionState::Starting => "starting",
            PartitionState::Running => "running",
            PartitionState::Stopping => "stopping",
            PartitionState::Failed => "failed",
        }
    }
}

/// `GET /partitions/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PartitionInfo {
    pub id: String,
    pub kind: PartitionKind,
    pub state: PartitionState,
    /// What was asked for.
    pub spec: PartitionSpec,
    /// The model it serves (a swap changes it); empty for a Linux partition.
    pub model: String,
    pub model_path: String,
    pub vcpus: u32,
    /// Host CPUs its vCPU threads are pinned to, one per vCPU (empty: not placed).
    pub host_cpus: Vec<usize>,
    pub numa_node: Option<u32>,
    pub memory_mib: u64,
    pub hugepages: bool,
    pub context_length: u32,
    /// Seconds since it last became running.
    pub uptime_secs: Option<f64>,
    /// Why it failed, or why the last model swap was refused.
    pub error: Option<String>,
    /// A model swap under way: the model being loaded.
    pub swapping_to: Option<String>,
    pub counters: PartitionCounters,
    /// Host PCI devices the partition holds.
    pub devices: Vec<String>,
    /// A Linux partition's guest (None for an inference partition).
    pub linux: Option<LinuxStatus>,
}

/// The Linux guest of a partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LinuxStatus {
    pub kernel: String,
    pub initrd: Option<String>,
    /// The command line the kernel got (with the host's workarounds, once booted).
    pub cmdline: String,
    /// How the last boot ended (power-off, reset, triple fault, ...), if it has.
    pub end: Option<String>,
    /// Exits of the guest's vCPUs, summed, for the current or last boot
    /// (sampled every 0.2 s while it runs).
    pub exits: LinuxExits,
    /// Bytes the guest wrote to its serial console in its current or last boot.
    pub console_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LinuxExits {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio: u64,
}

/// `GET /partitions/{id}/console`: the end of a Linux partition's serial console log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConsoleTail {
    pub partition: String,
    /// Size of the whole log (the current or last boot), in bytes.
    pub size_bytes: u64,
    /// Where `text` starts in the log.
    pub offset: u64,
    /// The log from `offset` to its end (invalid UTF-8 replaced by U+FFFD).
    pub text: String,
}

/// `GET /devices`: a host PCI device and who holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceInfo {
    /// Domain:bus:device.function, e.g. "0000:17:00.0".
    pub address: String,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub numa_node: Option<u32>,
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// Whether VFIO could take it as the host is now (`not_assignable` says why not).
    pub assignable: bool,
    pub not_assignable: Option<String>,
    /// The partition holding it.
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PartitionCounters {
    /// Completions finished (any outcome).
    pub requests: u64,
    pub requests_cancelled: u64,
    pub requests_failed: u64,
    pub prompt_tokens: u64,
    pub tokens_generated: u64,
    /// Requests waiting or running.
    pub queue_depth: u64,
    /// VM exits of the running guest (MMIO exits and notifications).
    pub vcpu_exits: u64,
    /// Times the partition booted.
    pub boots: u64,
}

/// `PUT /partitions/{id}/model`: load another model into a partition. The
/// old model keeps serving until the new one is ready; if it cannot be
/// loaded the swap is refused and the old one stays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSwap {
    pub model: String,
    /// Context length for the new model (default: as before, capped by the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
}

/// `POST /models`: make a GGUF file known under a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelRegistration {
    /// 1 to 63 characters of `a-z A-Z 0-9 - _ .`.
    pub name: String,
    /// Absolute path of the GGUF file.
    pub path: String,
}

/// `GET /models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelInfo {
    pub name: String,
    pub path: String,
    /// `general.architecture`: llama, qwen2, gemma3, ...
    pub architecture: String,
    /// `general.name`, if the file has one.
    pub display_name: Option<String>,
    pub size_bytes: u64,
    /// The most common weight format, by bytes (e.g. Q4_K).
    pub quantization: String,
    /// Parameters (elements of all tensors).
    pub parameters: u64,
    /// The model's training context length.
    pub context_length: u64,
    pub layers: u64,
    pub vocab_size: u64,
    /// Partitions serving it now.
    pub used_by: Vec<String>,
}

/// Sampling parameters of a completion (the engine's; see `aivmm run --help`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// 0 is greedy.
    #[serde(default = "Sampling::default_temperature")]
    pub temperature: f32,
    #[serde(default = "Sampling::default_top_k")]
    pub top_k: u32,
    #[serde(default = "Sampling::default_top_p")]
    pub top_p: f32,
    #[serde(default = "Sampling::default_min_p")]
    pub min_p: f32,
    #[serde(default = "Sampling::default_repeat_penalty")]
    pub repeat_penalty: f32,
    #[serde(default = "Sampling::default_repeat_last_n")]
    pub repeat_last_n: u32,
    #[serde(default = "Sampling::default_seed")]
    pub seed: u64,
}

impl Sampling {
    fn default_temperature() -> f32 {
        0.8
    }
    fn default_top_k() -> u32 {
        40
    }
    fn default_top_p() -> f32 {
        0.95
    }
    fn default_min_p() -> f32 {
        0.05
    }
    fn default_repeat_penalty() -> f32 {
        1.0
    }
    fn default_repeat_last_n() -> u32 {
        64
    }
    fn default_seed() -> u64 {
        0x5eed
    }

    /// Greedy decoding: what `temperature: 0` means.
    pub fn greedy() -> Sampling {
        Sampling {
            temperature: 0.0,
            ..Sampling::default()
        }
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: Self::default_temperature(),
            top_k: Self::default_top_k(),
            top_p: Self::default_top_p(),
            min_p: Self::default_min_p(),
            repeat_penalty: Self::default_repeat_penalty(),
            repeat_last_n: Self::default_repeat_last_n(),
            seed: Self::default_seed(),
        }
    }
}

/// `POST /partitions/{id}/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    /// The whole context (special tokens such as `<start_of_turn>` are recognised).
    pub prompt: String,
    /// Wrap the prompt in the model's chat turn format.
    #[serde(default)]
    pub chat: bool,
    #[serde(default = "CompletionRequest::default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default)]
    pub sampling: Sampling,
    /// Stop before any of these strings (at most 4, each 1 to 256 characters).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Keep generating after end-of-generation tokens (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Stream server-sent events (default) or answer one JSON object.
    #[serde(default = "yes")]
    pub stream: bool,
}

impl CompletionRequest {
    fn default_max_tokens() -> u32 {
        128
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context is full.
    ContextFull,
    /// The client went away or the partition was stopped.
    Cancelled,
}

/// The end of a completion: its text and how it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CompletionResult {
    pub partition: String,
    pub model: String,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Tokens of the whole context, of them processed now, and reused from
    /// the partition's cache.
    pub prompt_tokens: u64,
    pub prompt_tokens_processed: u64,
    pub prompt_tokens_reused: u64,
    pub completion_tokens: u64,
    /// Time to first token and rates, from the guest's clock.
    pub ttft_ms: f64,
    pub prompt_tokens_per_sec: f64,
    pub tokens_per_sec: f64,
    /// Time the request waited in the daemon: from its receipt to its
    /// first token, less the guest's time to first token.
    pub queue_ms: f64,
    pub vcpu_exits: u64,
}

/// One server-sent event of a streamed `POST /partitions/{id}/completions`:
/// `event: token` with a [`TokenEvent`], then `event: done` with a
/// [`CompletionResult`], or `event: error` with an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenEvent {
    /// Text of the token (may be empty while a UTF-8 character is incomplete).
    pub text: String,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    pub status: String,
    pub partitions: u64,
    pub partitions_running: u64,
    pub uptime_secs: f64,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Version {
    pub version: String,
    /// Version of this API (paths and schemas).
    pub api_version: String,
    /// Version of the guest ABI of the inference kernel.
    pub guest_abi: u32,
}

/// `GET /stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Stats {
    pub uptime_secs: f64,
    pub partitions: Vec<PartitionStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PartitionStats {
    pub id: String,
    pub state: PartitionState,
    pub model: String,
    pub counters: PartitionCounters,
    /// Generation rate of the last completion.
    pub tokens_per_sec: f64,
    pub ttft_ms: Percentiles,
    /// Time between consecutive tokens, from the guest's clock.
    pub token_latency_ms: Percentiles,
    /// p99 - p50 of the token latency.
    pub jitter_ms: f64,
    pub guest_memory_bytes: u64,
}

/// Percentiles over the recent window (the last 4096 values).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Every error: `{"error": {...}}`, the shape OpenAI clients understand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: see [`crate::ErrorCode`].
    pub code: String,
    /// What was wrong and what to do.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// The OpenAI error class (`invalid_request_error`, `server_error`, ...).
    #[serde(rename = "type")]
    pub kind: String,
}

/// Checks a partition name.
pub fn validate_partition_id(id: &str) -> Result<(), String> {
    let ok_len = (1..=63).contains(&id.len());
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    let ok_start = id
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok_len && ok_chars && ok_start {
        Ok(())
    } else {
        Err(format!(
            "{id:?} is not a valid partition id: use 1 to 63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
        ))
    }
}

/// Checks a model name.
pub fn validate_model_name(name: &str) -> Result<(), String> {
    let ok_len = (1..=63).contains(&name.len());
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok_len && ok_chars && !name.starts_with('.') {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid model name: use 1 to 63 characters of a-z, A-Z, 0-9, '-', '_' and '.', not starting with '.'"
        ))
    }
}
