//! `aivmm run`: one partition running a model, tokens streamed to stdout, a
//! summary on stderr (or one JSON object with `--json`); without `--prompt`,
//! an interactive chat whose whole conversation goes to the partition each
//! turn (the guest's session reuses what it already holds).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aivmm_engine::chat::{ChatTemplate, Message, Role};
use aivmm_engine::generate::Flow;
use aivmm_engine::model::Model;
use aivmm_engine::sampling::SamplerConfig;
use clap::Parser;
use serde::Serialize;

use crate::host_engine::{HostEngineError, MappedModel, Report};
use crate::inference::{
    plan_memory, simd_name, Completion, GenerationRequest, InferenceError, InferencePartition,
    MemoryPlan, Prompt, Ready,
};
use crate::isolation::{CgroupRequest, CgroupScope, IsolationConfig};
use crate::model_store::{self, ModelStoreError};
use crate::partition::{GuestRequests, PartitionConfig};
use crate::stats::LatencyStats;
use crate::vstate::memory::RamBacking;

/// How long the guest may take to load and warm up (the 1 GiB-per-3-s first
/// touch cost of nested KVM, for the largest models we expect, and then some).
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug, Clone)]
#[command(name = "run")]
pub struct RunArgs {
    /// GGUF model file (default: Gemma 3 270M Q4_K_M, fetched and verified on first use).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Prompt text (special tokens such as <start_of_turn> are recognised). Without
    /// it, an interactive chat reads turns from standard input.
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    /// Wrap --prompt in the model's chat turn format.
    #[arg(long)]
    pub chat: bool,
    /// System message for chat mode.
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = SamplerConfig::default().temperature)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long, default_value_t = SamplerConfig::default().top_k)]
    pub top_k: usize,
    /// Nucleus sampling mass (1.0 = off).
    #[arg(long, default_value_t = SamplerConfig::default().top_p)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the best (0 = off).
    #[arg(long, default_value_t = SamplerConfig::default().min_p)]
    pub min_p: f32,
    /// Penalty for recently seen tokens (1.0 = off).
    #[arg(long, default_value_t = SamplerConfig::default().repeat_penalty)]
    pub repeat_penalty: f32,
    /// Seed of the sampler (the same seed reproduces a run).
    #[arg(long, default_value_t = SamplerConfig::default().seed)]
    pub seed: u64,
    /// vCPUs of the partition (default: one per host core this process may use,
    /// or one per CPU of --cpus).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Host CPUs to pin the vCPU threads to, one per vCPU: "0,1", "0-3", "0-1,4".
    #[arg(long)]
    pub cpus: Option<String>,
    /// Guest memory, e.g. 512M or 2G (default: what the model and context need,
    /// plus some room).
    #[arg(long)]
    pub memory: Option<String>,
    /// Context size in tokens (default: 4096 or the model's, if smaller).
    #[arg(long, default_value_t = 0)]
    pub ctx_size: usize,
    /// Tokens per batch when processing the prompt.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Back guest memory with 2 MiB hugepages (reserved in /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    pub hugepages: bool,
    /// Keep generating after end-of-generation tokens (benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object with the tokens, text and timings instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Copy the inference kernel's log to stderr.
    #[arg(long)]
    pub guest_log: bool,
    #[command(flatten)]
    pub linux: crate::linux::cli::LinuxArgs,
    /// NUMA node for guest memory (bound with MPOL_BIND; hugepages come from
    /// this node's pool) and the partition's cgroup.
    #[arg(long)]
    pub numa_node: Option<u32>,
    /// Print per-token latency percentiles and jitter (p99 - p50) after each
    /// completion (with --json they are always in the report).
    #[arg(long)]
    pub stats: bool,
    /// Do not put this process in a cgroup of its own (cpuset of --cpus and
    /// --numa-node, memory limit); needed when not root.
    #[arg(long)]
    pub no_cgroup: bool,
    /// No seccomp filters on the vCPU and event threads (debugging).
    #[arg(long)]
    pub no_seccomp: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "/dev/kvm not found: aivmm needs KVM; load kvm_intel/kvm_amd or run `aivmm generate --host`"
    )]
    NoKvm,
    #[error(transparent)]
    ModelStore(#[from] ModelStoreError),
    #[error(transparent)]
    Model(#[from] HostEngineError),
    #[error("invalid sampling parameters: {0}")]
    Sampling(&'static str),
    #[error("--vcpus must be between 1 and {max}, not {given}", max = aivmm_guest_abi::MAX_VCPUS)]
    Vcpus { given: u32 },
    #[error("--cpus {list:?}: {why}")]
    Cpus { list: String, why: String },
    #[error("--memory {given:?}: {why}")]
    MemorySize { given: String, why: &'static str },
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error("the partition did not end cleanly: {0}")]
    Exit(String),
    #[error("--json needs --prompt (interactive chat prints text)")]
    JsonNeedsPrompt,
    #[error(transparent)]
    Linux(#[from] crate::linux::cli::LinuxCliError),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot write the JSON report: {0}")]
    Json(#[from] serde_json::Error),
}

/// `generate --json`'s report plus what only a partition has.
#[derive(Debug, Serialize)]
pub struct RunReport {
    #[serde(flatten)]
    pub completion: Report,
    /// VMM set-up and guest boot to ready, without the warm-up.
    pub partition_start_ms: f64,
    /// The guest touching its working memory and the model window, and
    /// zero-filling the session's memory.
    pub warmup_ms: f64,
    pub vmm_setup_ms: f64,
    /// `Gguf::parse` + `Model::load` in the guest, and the parse alone.
    pub guest_model_load_ms: f64,
    pub guest_model_parse_ms: f64,
    /// Mapping, parsing and sizing the model on the host before the partition starts.
    pub host_prepare_ms: f64,
    /// Exits of the partition while the request ran, and per generated token.
    pub exits: u64,
    pub exits_per_token: f64,
    /// Request sent to first token received, on the host's clock.
    pub host_ttft_ms: f64,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub n_ctx: usize,
    pub context_tokens: usize,
    pub reused_tokens: usize,
    pub guest_heap_peak_bytes: u64,
    /// Time between consecutive tokens (guest TSC): percentiles and jitter.
    pub token_latency: LatencyStats,
}

/// Parses "512M", "2G", "1024K", "3T" or a byte count (binary units).
pub fn parse_memory_size(text: &str) -> Result<u64, RunError> {
    let error = |why| RunError::MemorySize {
        given: text.into(),
        why,
    };
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let value: u64 = digits
        .trim()
        .parse()
        .map_err(|_| error("not a size; write e.g. 512M or 2G"))?;
    let bytes = value
        .checked_mul(1 << shift)
        .ok_or_else(|| error("too large"))?;
    if bytes == 0 {
        return Err(error("must be more than 0"));
    }
    Ok(bytes)
}

/// Parses a CPU list ("0,1", "0-3", "0-1,4") into CPU numbers, in order.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim) {
        if part.is_empty() {
            return Err("empty entry (write e.g. 0,1 or 0-3)".into());
        }
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?} is not a CPU number"))
        };
        let (first, last) = (number(first)?, number(last)?);
        if first > last {
            return Err(format!("range {part} runs backwards"));
        }
        for cpu in first..=last {
            if cpus.contains(&cpu) {
                return Err(format!("CPU {cpu} appears twice (one vCPU per CPU)"));
            }
            cpus.push(cpu);
        }
    }
    Ok(cpus)
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain bits (zero is the empty set); the kernel
    // writes at most size_of::<cpu_set_t>() bytes into it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        set
    };
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: cpu < CPU_SETSIZE, in bounds of the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

pub fn online_cpus() -> Option<Vec<usize>> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    parse_cpu_list(text.trim()).ok()
}

fn describe_cpus(cpus: &[usize]) -> String {
    cpus.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The vCPU count and the pinning, checked against the host.
pub fn resolve_cpus(
    vcpus: Option<u32>,
    cpus: Option<&str>,
) -> Result<(u32, Option<Vec<usize>>), RunError> {
    let pinned = match cpus {
        None => None,
        Some(list) => {
            let cpus_error = |why: String| RunError::Cpus {
                list: list.into(),
                why,
            };
            let cpus = parse_cpu_list(list).map_err(cpus_error)?;
            let online = online_cpus();
            let allowed = allowed_cpus().map_err(|error| {
                cpus_error(format!("cannot read this process's CPU affinity: {error}"))
            })?;
            for &cpu in &cpus {
                if let Some(online) = &online {
                    if !online.contains(&cpu) {
                        return Err(cpus_error(format!(
                            "CPU {cpu} is offline or does not exist (online: {})",
                            describe_cpus(online)
                        )));
                    }
                }
                if !allowed.contains(&cpu) {
                    return Err(cpus_error(format!(
                        "this process may not run on CPU {cpu} (allowed: {})",
                        describe_cpus(&allowed)
                    )));
                }
            }
            if let Some(vcpus) = vcpus {
                if vcpus as usize != cpus.len() {
                    return Err(cpus_error(format!(
                        "{} CPU(s) for {vcpus} vCPU(s); give one CPU per vCPU",
                        cpus.len()
                    )));
                }
            }
            Some(cpus)
        }
    };
    let vcpus = match (vcpus, &pinned) {
        (Some(vcpus), _) => vcpus,
        (None, Some(cpus)) => cpus.len() as u32,
        (None, None) => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    if vcpus == 0 || vcpus > aivmm_guest_abi::MAX_VCPUS {
        return Err(RunError::Vcpus { given: vcpus });
    }
    Ok((vcpus, pinned))
}

impl RunArgs {
    pub fn sampling(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplerConfig::default()
        }
    }
}

/// Everything decided before the partition starts.
pub struct Prepared {
    pub vcpus: u32,
    pub host_cpus: Option<Vec<usize>>,
    pub plan: MemoryPlan,
    pub memory_bytes: u64,
}

/// Checks the arguments against the model and the host, and sizes the
/// partition: every refusal (bad CPU list, too little memory, ...) happens
/// here, before anything boots.
pub fn prepare(args: &RunArgs, model: &Model<'_>) -> Result<Prepared, RunError> {
    args.sampling().validate().map_err(RunError::Sampling)?;
    let (vcpus, host_cpus) = resolve_cpus(args.vcpus, args.cpus.as_deref())?;
    let plan = plan_memory(model, args.ctx_size, args.batch, vcpus)?;
    let given = args.memory.as_deref().map(parse_memory_size).transpose()?;
    let memory_bytes = plan.memory_bytes(given)?;
    Ok(Prepared {
        vcpus,
        host_cpus,
        plan,
        memory_bytes,
    })
}

/// What the VMM process may use beyond guest RAM and the model file.
const VMM_MEMORY_ROOM: u64 = 512 << 20;

/// The partition configuration for a prepared run of `model_path`.
pub fn partition_config(args: &RunArgs, prepared: &Prepared, model_path: &Path) -> PartitionConfig {
    let model_bytes = std::fs::metadata(model_path).map_or(0, |m| m.len());
    PartitionConfig {
        vcpus: prepared.vcpus,
        memory_bytes: prepared.memory_bytes,
        backing: RamBacking::with_hugepages(args.hugepages),
        host_cpus: prepared.host_cpus.clone(),
        numa_node: args.numa_node,
        isolation: IsolationConfig {
            // The process is the partition: all of it goes in the cgroup, and
            // its memory is limited to the guest's, the model's and room for
            // the VMM itself.
            cgroup: (!args.no_cgroup).then(|| CgroupRequest {
                name: format!("run-{}", std::process::id()),
                scope: CgroupScope::Process,
                memory_limit: Some(prepared.memory_bytes + model_bytes + VMM_MEMORY_ROOM),
            }),
            seccomp: !args.no_seccomp,
        },
        stack_bytes: crate::inference::STACK_BYTES,
        model: Some(model_path.to_path_buf()),
        console_forward: args
            .guest_log
            .then(|| Box::new(std::io::stderr()) as Box<dyn Write + Send>),
        console_capture_limit: 1 << 16,
        guest_requests: GuestRequests::default(),
        inference: Some(prepared.plan.setup()),
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The report of one completion, in `generate --json`'s terms and more.
pub fn run_report(
    model: &Model<'_>,
    prepared: &Prepared,
    ready: &Ready,
    host_prepare: Duration,
    completion: &Completion,
) -> RunReport {
    RunReport {
        completion: Report {
            model: model.name.to_string(),
            arch: model.config.arch.name(),
            threads: prepared.vcpus as usize,
            simd: simd_name(ready.info.simd_level).to_string(),
            prompt_tokens: completion.n_fed,
            prompt_ms: completion.prompt_ms,
            ttft_ms: completion.ttft_ms,
            gen_tokens: completion.tokens.len(),
            gen_ms: completion.gen_ms,
            token_ms: completion.token_ms.clone(),
            prompt_tok_s: completion.prompt_tok_s(),
            gen_tok_s: completion.gen_tok_s(),
            tokens: completion.tokens.clone(),
            text: completion.text.clone(),
            stop: completion.stop.as_str(),
        },
        partition_start_ms: ms(ready.start()),
        warmup_ms: ms(ready.warmup),
        vmm_setup_ms: ms(ready.setup),
        guest_model_load_ms: ms(ready.model_load),
        guest_model_parse_ms: ms(ready.model_parse),
        host_prepare_ms: ms(host_prepare),
        exits: completion.exits,
        exits_per_token: completion.exits_per_token(),
        host_ttft_ms: completion.host_ttft_ms,
        vcpus: prepared.vcpus,
        memory_bytes: prepared.memory_bytes,
        n_ctx: prepared.plan.limits.n_ctx,
        context_tokens: completion.n_context,
        reused_tokens: completion.n_reused,
        guest_heap_peak_bytes: completion.heap_peak,
        token_latency: LatencyStats::of_token_times(&completion.token_ms),
    }
}

/// The line printed to stderr once the partition is ready.
pub fn print_ready(w: &mut dyn Write, prepared: &Prepared, ready: &Ready) -> std::io::Result<()> {
    writeln!(
        w,
        "[partition: {} vCPU(s), {} MiB, {} tokens of context | start {:.1} ms (VMM {:.1} ms, guest model parse + load {:.1} + {:.1} ms) | warm-up {:.1} ms ({} MiB of memory in {:.1} ms, model window in {:.1} ms, session zero-fill {:.1} ms)]",
        prepared.vcpus,
        prepared.memory_bytes >> 20,
        prepared.plan.limits.n_ctx,
        ms(ready.start()),
        ms(ready.setup),
        ms(ready.model_parse),
        ms(ready.model_load.saturating_sub(ready.model_parse)),
        ms(ready.warmup),
        prepared.plan.warmup_heap_bytes >> 20,
        ms(ready.warmup_heap),
        ms(ready.warmup_window),
        ms(ready.session),
    )
}

/// The `--stats` line: per-token latency percentiles and jitter.
pub fn print_latency(w: &mut dyn Write, stats: &LatencyStats) -> std::io::Result<()> {
    writeln!(
        w,
        "[token latency over {} gaps: p50 {:.3} ms | p90 {:.3} ms | p99 {:.3} ms | max {:.3} ms | mean {:.3} ms | jitter (p99 - p50) {:.3} ms = {:.1}% of p50]",
        stats.count,
        stats.p50_ms,
        stats.p90_ms,
        stats.p99_ms,
        stats.max_ms,
        stats.mean_ms,
        stats.jitter_ms,
        stats.jitter_ratio() * 100.0,
    )
}

/// The summary printed to stderr after each completion.
pub fn print_completion(w: &mut dyn Write, report: &RunReport) -> std::io::Result<()> {
    let r = &report.completion;
    writeln!(
        w,
        "[{} tokens prompt in {:.1} ms ({:.1} tok/s) | first token {:.1} ms | {} tokens generated at {:.1} tok/s | {} exits, {:.2}/token | {} vCPU(s), {} | stop: {}]",
        r.prompt_tokens,
        r.prompt_ms,
        r.prompt_tok_s,
        r.ttft_ms,
        r.gen_tokens,
        r.gen_tok_s,
        report.exits,
        report.exits_per_token,
        r.threads,
        r.simd,
        r.stop
    )
}

pub fn cmd_run(args: RunArgs) -> Result<(), RunError> {
    if !Path::new("/dev/kvm").exists() {
        return Err(RunError::NoKvm);
    }
    if let Some(kernel) = args.linux.kernel.clone() {
        return run_linux(&args, kernel);
    }
    if args.prompt.is_none() && args.json {
        return Err(RunError::JsonNeedsPrompt);
    }
    let model_path = match &args.model {
        Some(path) => path.clone(),
        None => model_store::fetch(model_store::DEFAULT_MODEL)?,
    };
    let host_started = Instant::now();
    let mapped = MappedModel::open(&model_path)?;
    let gguf = mapped.parse()?;
    let model = mapped.load(&gguf)?;
    let template = ChatTemplate::for_model(&gguf, model.config.arch);
    let prepared = prepare(&args, &model)?;
    let host_prepare = host_started.elapsed();

    let config = partition_config(&args, &prepared, &model_path);
    let mut partition = InferencePartition::start(config, READY_TIMEOUT)?;
    let ready = *partition.ready();
    if !args.json {
        print_ready(&mut std::io::stderr(), &prepared, &ready)?;
    }
    let sampling = args.sampling();
    let request = |prompt| GenerationRequest {
        prompt,
        max_tokens: args.max_tokens,
        sampling,
        stop_at_eog: !args.ignore_eos,
    };
    let mut stdout = std::io::stdout();

    match &args.prompt {
        Some(prompt) => {
            let text = if args.chat {
                template.render_turn(args.system.as_deref(), prompt)
            } else {
                prompt.clone()
            };
            let completion = partition.generate(&request(Prompt::Text(&text)), &mut |piece| {
                // Nobody reads the output any more (a closed pipe): stop.
                if !args.json
                    && stdout
                        .write_all(piece.as_bytes())
                        .and_then(|()| stdout.flush())
                        .is_err()
                {
                    return Flow::Stop;
                }
                Flow::Continue
            })?;
            let report = run_report(&model, &prepared, &ready, host_prepare, &completion);
            if args.json {
                serde_json::to_writer(&mut stdout, &report)?;
                writeln!(stdout)?;
            } else {
                writeln!(stdout)?;
                print_completion(&mut std::io::stderr(), &report)?;
                if args.stats {
                    print_latency(&mut std::io::stderr(), &report.token_latency)?;
                }
            }
        }
        None => {
            eprintln!(
                "[chat with {} ({} template) in the partition; end with Ctrl-D]",
                model.name,
                template.name()
            );
            let stdin = std::io::stdin();
            chat(
                &mut partition,
                &model,
                template,
                args.system.as_deref(),
                &request(Prompt::Text("")),
                prepared.plan.limits.n_ctx,
                &mut stdin.lock(),
                &mut stdout,
                &mut |completion: &Completion| {
                    let report = run_report(&model, &prepared, &ready, host_prepare, completion);
                    print_completion(&mut std::io::stderr(), &report)?;
                    if args.stats {
                        print_latency(&mut std::io::stderr(), &report.token_latency)?;
                    }
                    Ok(())
                },
            )?;
        }
    }
    let outcome = partition.exit(EXIT_TIMEOUT)?;
    match outcome.result {
        Ok(0) => Ok(()),
        Ok(status) => Err(RunError::Exit(format!("guest exit status {status}"))),
        Err(error) => Err(RunError::Exit(error.to_string())),
    }
}

/// `aivmm run --kernel`: a Linux guest, one vCPU unless told otherwise.
fn run_linux(args: &RunArgs, kernel: PathBuf) -> Result<(), RunError> {
    let vcpus = args.vcpus.or(args.cpus.is_none().then_some(1));
    let (vcpus, host_cpus) = resolve_cpus(vcpus, args.cpus.as_deref())?;
    let memory = args
        .memory
        .as_deref()
        .unwrap_or(crate::linux::cli::DEFAULT_MEMORY);
    let memory_bytes = parse_memory_size(memory)?;
    let resources = crate::linux::cli::Resources {
        vcpus,
        host_cpus,
        memory_bytes,
        backing: RamBacking::with_hugepages(args.hugepages),
        numa_node: args.numa_node,
        seccomp: !args.no_seccomp,
    };
    crate::linux::cli::run(&args.linux, kernel, resources)?;
    Ok(())
}

fn render(template: ChatTemplate, history: &[(Role, String)]) -> String {
    let messages: Vec<Message<'_>> = history
        .iter()
        .map(|(role, content)| Message {
            role: *role,
            content,
        })
        .collect();
    template.render(&messages, true)
}

/// An interactive chat through the partition: each input line is a user
/// turn; the whole rendered conversation is sent each time (the guest feeds
/// only what its session does not hold yet). The host's tokenizer checks that
/// the conversation fits the context, forgetting old turns when it does not.
#[allow(clippy::too_many_arguments)]
pub fn chat(
    partition: &mut InferencePartition,
    model: &Model<'_>,
    template: ChatTemplate,
    system: Option<&str>,
    request: &GenerationRequest<'_>,
    n_ctx: usize,
    input: &mut dyn BufRead,
    output: &mut dyn Write,
    on_completion: &mut dyn FnMut(&Completion) -> std::io::Result<()>,
) -> Result<(), RunError> {
    let mut history: Vec<(Role, String)> = Vec::new();
    if let Some(system) = system {
        history.push((Role::System, system.to_string()));
    }
    let fits =
        |text: &str| model.tokenizer.encode(text, true, true).len() + request.max_tokens <= n_ctx;
    loop {
        write!(output, "> ")?;
        output.flush()?;
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            writeln!(output)?;
            return Ok(());
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        history.push((Role::User, line.to_string()));
        let mut text = render(template, &history);
        if !fits(&text) {
            eprintln!("[context full: earlier turns forgotten]");
            history.retain(|(role, _)| *role == Role::System);
            history.push((Role::User, line.to_string()));
            text = render(template, &history);
            if !fits(&text) {
                eprintln!("[this message alone does not fit the context; raise --ctx-size]");
                history.pop();
                continue;
            }
        }
        let mut write_error = None;
        let completion = partition.generate(
            &GenerationRequest {
                prompt: Prompt::Text(&text),
                ..*request
            },
            &mut |piece| {
                if let Err(error) = output
                    .write_all(piece.as_bytes())
                    .and_then(|()| output.flush())
                {
                    write_error.get_or_insert(error);
                    return Flow::Stop;
                }
                Flow::Continue
            },
        )?;
        if let Some(error) = write_error {
            return Err(RunError::Output(error));
        }
        writeln!(output)?;
        on_completion(&completion)?;
        history.push((Role::Assistant, completion.text.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_memory_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory_size("1024k").unwrap(), 1 << 20);
        assert_eq!(parse_memory_size("4194304").unwrap(), 4 << 20);
        assert!(parse_memory_size("lots").is_err());
        assert!(parse_memory_size("0M").is_err());
        assert!(parse_memory_size("99999999999T").is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,1").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpu_list("0-3").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_cpu_list("0-1, 4").unwrap(), vec![0, 1, 4]);
        assert!(parse_cpu_list("1-0").is_err());
        assert!(parse_cpu_list("0,0").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("").is_err());
    }

    #[test]
    fn offline_and_mismatched_cpus_are_refused() {
        let error = resolve_cpus(None, Some("4095")).unwrap_err().to_string();
        assert!(
            error.contains("CPU 4095 is offline") || error.contains("may not run on CPU 4095"),
            "{error}"
        );
        let allowed = allowed_cpus().unwrap();
        let one = allowed[0].to_string();
        let error = resolve_cpus(Some(2), Some(&one)).unwrap_err().to_string();
        assert!(error.contains("give one CPU per vCPU"), "{error}");
        assert_eq!(
            resolve_cpus(None, Some(&one)).unwrap(),
            (1, Some(vec![allowed[0]]))
        );
        assert!(resolve_cpus(Some(0), None).is_err());
    }

    #[test]
    fn sampling_defaults_match_the_engine() {
        let args = RunArgs::try_parse_from(["run", "--prompt", "hi"]).unwrap();
        assert_eq!(args.sampling(), SamplerConfig::default());
        assert_eq!((args.max_tokens, args.batch, args.ctx_size), (256, 32, 0));
    }
}
