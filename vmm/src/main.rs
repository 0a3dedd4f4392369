//! The `aivmm` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use aivmm::daemon::cli::{self, ClientArgs, CompleteArgs, ModelCommand, PartitionCommand};
use aivmm::host_engine::{print_summary, HostEngine, HostOptions, MappedModel};
use aivmm::model_store;
use aivmm_engine::chat::ChatTemplate;
use aivmm_engine::quant::{Kernels, SimdLevel};
use aivmm_engine::sampling::SamplerConfig;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "aivmm",
    version,
    about = "Carve a server into isolated AI partitions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the inference engine directly on the host (no partition): the
    /// reference point, in output and speed, for what partitions run.
    Generate(GenerateArgs),
    /// Run a model in a KVM partition: tokens stream to stdout, a summary to
    /// stderr; without --prompt, an interactive chat.
    Run(aivmm::run::RunArgs),
    /// The control daemon: partitions, models, completions and telemetry
    /// over a REST API on a Unix socket (and optionally TCP).
    Serve(aivmm::daemon::ServeArgs),
    /// Manage the daemon's partitions.
    Partition {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: PartitionCommand,
    },
    /// The daemon's models: list, register, swap into a partition.
    Model {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Run a completion in one of the daemon's partitions, streaming the text.
    Complete {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: CompleteArgs,
    },
    /// Per-partition telemetry from the daemon.
    Stats {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Is the daemon up, and which version is it.
    Health {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The host's PCI devices as the daemon sees them: assignable or why
    /// not, and which partition holds each.
    Devices {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// What this host offers partitions: cores with their SMT siblings, NUMA
    /// nodes with memory and hugepages, isolated CPUs, PCI devices.
    Topology(aivmm::host::cli::TopologyArgs),
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    temperature: f32,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling mass (1.0 = off).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the best (0 = off).
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for recently seen tokens (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Seed of the sampler (the same seed reproduces a run).
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
}

impl SamplingArgs {
    fn config(&self) -> SamplerConfig {
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

#[derive(Clone, Copy, ValueEnum)]
enum SimdArg {
    Scalar,
    Avx2,
    Avx512,
    Avx512vnni,
}

#[derive(Args)]
struct GenerateArgs {
    /// Run in this process on the host. This is what `generate` does; the flag
    /// exists so scripts can say so explicitly (`aivmm run` runs in a partition).
    #[arg(long)]
    host: bool,
    /// GGUF model file (default: Gemma 3 270M Q4_K_M, fetched and verified on first use).
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Prompt text (special tokens such as <start_of_turn> are recognised). Without
    /// it, an interactive chat reads turns from standard input.
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// Wrap --prompt in the model's chat turn format.
    #[arg(long)]
    chat: bool,
    /// System message for chat mode.
    #[arg(long)]
    system: Option<String>,
    /// Maximum tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    max_tokens: usize,
    /// Engine threads (default: all available cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Context size in tokens (default: 4096 or the model's, if smaller).
    #[arg(long, default_value_t = 0)]
    ctx_size: usize,
    /// Tokens per batch when processing the prompt.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Keep generating after end-of-generation tokens (benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Force a SIMD kernel level (default: the best this CPU supports).
    #[arg(long, value_enum)]
    simd: Option<SimdArg>,
    /// Print one JSON object with the tokens, text and timings instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => cmd_generate(args),
        Command::Run(args) => aivmm::run::cmd_run(args).map_err(Into::into),
        Command::Serve(args) => aivmm::daemon::cmd_serve(args).map_err(Into::into),
        Command::Partition { client, command } => {
            cli::partition(&client, &command).map_err(Into::into)
        }
        Command::Model { client, command } => cli::model(&client, &command).map_err(Into::into),
        Command::Complete { client, args } => cli::complete(&client, &args).map_err(Into::into),
        Command::Stats { client } => cli::stats(&client).map_err(Into::into),
        Command::Health { client } => cli::health(&client).map_err(Into::into),
        Command::Devices { client } => cli::devices(&client).map_err(Into::into),
        Command::Topology(args) => {
            aivmm::host::cli::cmd_topology(&args, &mut std::io::stdout().lock()).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aivmm: error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn cmd_generate(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let kernels = match args.simd {
        None => None,
        Some(s) => {
            let level = match s {
                SimdArg::Scalar => SimdLevel::Scalar,
                SimdArg::Avx2 => SimdLevel::Avx2,
                SimdArg::Avx512 => SimdLevel::Avx512,
                SimdArg::Avx512vnni => SimdLevel::Avx512Vnni,
            };
            Some(
                Kernels::with_level(level)
                    .ok_or_else(|| format!("this CPU does not support --simd {level:?}"))?,
            )
        }
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    let model_path = match args.model {
        Some(p) => p,
        None => model_store::fetch(model_store::DEFAULT_MODEL)?,
    };
    let mapped = MappedModel::open(&model_path)?;
    let gguf = mapped.parse()?;
    let model = mapped.load(&gguf)?;
    let template = ChatTemplate::for_model(&gguf, model.config.arch);
    let options = HostOptions {
        threads,
        n_ctx: args.ctx_size,
        max_batch: args.batch,
        max_tokens: args.max_tokens,
        sampling: args.sampling.config(),
        ignore_eos: args.ignore_eos,
        kernels,
    };
    let mut engine = HostEngine::new(model, options)?;

    let Some(prompt) = args.prompt else {
        if args.json {
            return Err("--json needs --prompt (interactive chat prints text)".into());
        }
        eprintln!(
            "[chat with {} ({} template); end with Ctrl-D]",
            engine.model.name,
            template.name()
        );
        let stdin = std::io::stdin();
        engine.chat(
            template,
            args.system.as_deref(),
            &mut stdin.lock(),
            &mut std::io::stdout(),
            &mut std::io::stderr(),
        )?;
        return Ok(());
    };
    let text = if args.chat {
        template.render_turn(args.system.as_deref(), &prompt)
    } else {
        prompt
    };
    let tokens = engine.tokenize_prompt(&text);
    let mut stdout = std::io::stdout();
    let report = engine.complete(&tokens, &mut |piece| {
        if !args.json {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if args.json {
        serde_json::to_writer(&mut stdout, &report)?;
        writeln!(stdout)?;
    } else {
        writeln!(stdout)?;
        print_summary(&mut std::io::stderr(), &report)?;
    }
    Ok(())
}
