//! The daemon's operations from the shell: `aivmm partition ...`, `aivmm
//! model ...`, `aivmm complete`, `aivmm stats`, `aivmm health`, `aivmm
//! devices`, over the API socket, printing tables (or the API's JSON with
//! `--json`).

use std::io::Write;
use std::path::PathBuf;

use aivmm_api::client::{Client, ClientError};
use aivmm_api::types::*;
use clap::{Args, Subcommand};

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The daemon's API socket.
    #[arg(
        long,
        env = "AIVMM_API_SOCK",
        default_value = "/run/aivmm.sock",
        global = true
    )]
    pub api_sock: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug, Clone)]
pub enum PartitionCommand {
    /// Create a partition (and boot it, unless --no-start).
    Create(Box<CreateArgs>),
    /// List partitions.
    List,
    /// Show one partition.
    Get {
        id: String,
    },
    Start {
        id: String,
    },
    Stop {
        id: String,
    },
    Restart {
        id: String,
    },
    /// Stop and remove a partition.
    Delete {
        id: String,
    },
    /// The end of a Linux partition's serial console log.
    Console {
        id: String,
        /// At most this many bytes, from the end.
        #[arg(long, default_value_t = 16384)]
        bytes: u64,
    },
}

#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    pub id: String,
    /// A model name (see `aivmm model list`), "default", or an absolute path
    /// to a GGUF file (default: "default", unless --kernel).
    #[arg(long, short = 'm', conflicts_with = "kernel")]
    pub model: Option<String>,
    /// Boot this Linux kernel (vmlinux or bzImage) instead of a model.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel (default: serial console on ttyS0).
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// Entry point of --kernel: auto, linux64 or pvh.
    #[arg(long, requires = "kernel", default_value = "auto", value_parser = parse_protocol)]
    pub boot_protocol: BootProtocol,
    /// A host PCI device to pass through to the Linux guest (repeatable).
    #[arg(long = "device", requires = "kernel")]
    pub devices: Vec<String>,
    /// A disk image or block device for the Linux guest, as virtio-blk
    /// (repeatable; PATH,ro attaches it read-only).
    #[arg(long = "disk", value_name = "PATH[,ro]", requires = "kernel")]
    pub disks: Vec<crate::linux::disk::DiskSpec>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Host CPUs, one per vCPU: "2,3" or "2-5".
    #[arg(long)]
    pub cores: Option<String>,
    /// Guest memory, e.g. 512M or 2G (default: what the model needs).
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub hugepages: bool,
    #[arg(long)]
    pub numa_node: Option<u32>,
    /// Context length in tokens.
    #[arg(long)]
    pub ctx_size: Option<u32>,
    /// Create it stopped.
    #[arg(long)]
    pub no_start: bool,
}

#[derive(Subcommand, Debug, Clone)]
pub enum ModelCommand {
    /// Models the daemon knows, with their metadata.
    List,
    /// Make a GGUF file known under NAME.
    Register { name: String, path: PathBuf },
    /// Load MODEL into a running partition; the old model serves until the new one is ready.
    Swap {
        partition: String,
        model: String,
        #[arg(long)]
        ctx_size: Option<u32>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct CompleteArgs {
    /// The partition to ask.
    pub partition: String,
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Wrap the prompt in the model's chat turn format.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    #[error("the completion failed: {0}")]
    Completion(String),
}

fn parse_protocol(text: &str) -> Result<BootProtocol, String> {
    serde_json::from_value(serde_json::Value::String(text.into()))
        .map_err(|_| format!("{text:?}: use auto, linux64 or pvh"))
}

/// An absolute path for the daemon (which has its own working directory).
fn absolute(path: &std::path::Path) -> Result<String, CliError> {
    std::path::absolute(path)
        .map(|path| path.display().to_string())
        .map_err(|error| CliError::Usage(format!("{}: {error}", path.display())))
}

fn client(args: &ClientArgs) -> Result<Client, CliError> {
    Ok(Client::new(&args.api_sock)?)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Usage(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Left-aligned columns.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn cpu_list(cpus: &[usize]) -> String {
    if cpus.is_empty() {
        return "-".into();
    }
    cpus.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn uptime(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

fn partition_rows(list: &[PartitionInfo]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.state.as_str().into(),
                match &p.linux {
                    Some(linux) => format!("linux {}", linux.kernel),
                    None => p.model.clone(),
                },
                p.vcpus.to_string(),
                cpu_list(&p.host_cpus),
                format!(
                    "{} MiB{}",
                    p.memory_mib,
                    if p.hugepages { " (2M pages)" } else { "" }
                ),
                p.context_length.to_string(),
                uptime(p.uptime_secs),
                p.counters.requests.to_string(),
                p.counters.tokens_generated.to_string(),
                p.counters.queue_depth.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID", "STATE", "MODEL", "VCPUS", "CPUS", "MEMORY", "CTX", "UPTIME", "REQUESTS",
            "TOKENS", "QUEUE",
        ],
        &rows,
    );
    for p in list {
        if let Some(error) = &p.error {
            println!("{}: {error}", p.id);
        }
        if let Some(model) = &p.swapping_to {
            println!("{}: swapping to {model}", p.id);
        }
    }
}

fn show_partition(args: &ClientArgs, info: &PartitionInfo) -> Result<(), CliError> {
    if args.json {
        print_json(info)
    } else {
        partition_rows(std::slice::from_ref(info));
        Ok(())
    }
}

pub fn partition(args: &ClientArgs, command: &PartitionCommand) -> Result<(), CliError> {
    let client = client(args)?;
    let none: Option<&()> = None;
    match command {
        PartitionCommand::Create(create) => {
            let cores = create
                .cores
                .as_deref()
                .map(crate::run::parse_cpu_list)
                .transpose()
                .map_err(|why| CliError::Usage(format!("--cores: {why}")))?;
            let memory_mib = create
                .memory
                .as_deref()
                .map(crate::run::parse_memory_size)
                .transpose()
                .map_err(|e| CliError::Usage(e.to_string()))?
                .map(|bytes| bytes >> 20);
            let linux = match &create.kernel {
                Some(kernel) => Some(LinuxSpec {
                    kernel: absolute(kernel)?,
                    initrd: create.initrd.as_deref().map(absolute).transpose()?,
                    cmdline: create.cmdline.clone(),
                    boot_protocol: create.boot_protocol,
                    disks: create
                        .disks
                        .iter()
                        .map(|disk| {
                            Ok(LinuxDisk {
                                path: absolute(&disk.path)?,
                                read_only: disk.read_only,
                            })
                        })
                        .collect::<Result<_, CliError>>()?,
                }),
                None => None,
            };
            let spec = PartitionSpec {
                id: create.id.clone(),
                model: match linux {
                    Some(_) => None,
                    None => Some(create.model.clone().unwrap_or_else(|| "default".into())),
                },
                linux,
                devices: create.devices.clone(),
                vcpus: create.vcpus,
                cores,
                memory_mib,
                hugepages: create.hugepages,
                numa_node: create.numa_node,
                context_length: create.ctx_size,
                start: !create.no_start,
            };
            let info: PartitionInfo = client.call("POST", "/partitions", Some(&spec))?;
            show_partition(args, &info)
        }
        PartitionCommand::List => {
            let list: Vec<PartitionInfo> = client.call("GET", "/partitions", none)?;
            if args.json {
                print_json(&list)
            } else {
                partition_rows(&list);
                Ok(())
            }
        }
        PartitionCommand::Get { id } => {
            let info: PartitionInfo = client.call("GET", &format!("/partitions/{id}"), none)?;
            show_partition(args, &info)
        }
        PartitionCommand::Start { id }
        | PartitionCommand::Stop { id }
        | PartitionCommand::Restart { id } => {
            let action = match command {
                PartitionCommand::Start { .. } => "start",
                PartitionCommand::Stop { .. } => "stop",
                _ => "restart",
            };
            let info: PartitionInfo =
                client.call("POST", &format!("/partitions/{id}/{action}"), none)?;
            show_partition(args, &info)
        }
        PartitionCommand::Delete { id } => {
            let () = client.call("DELETE", &format!("/partitions/{id}"), none)?;
            if args.json {
                print_json(&serde_json::json!({ "deleted": id }))
            } else {
                println!("deleted {id}");
                Ok(())
            }
        }
        PartitionCommand::Console { id, bytes } => {
            let tail: ConsoleTail = client.call(
                "GET",
                &format!("/partitions/{id}/console?bytes={bytes}"),
                none,
            )?;
            if args.json {
                print_json(&tail)
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(tail.text.as_bytes())?;
                out.flush()?;
                Ok(())
            }
        }
    }
}

/// `aivmm devices`: the host's PCI devices, whether each can be passed
/// through, and which partition holds it.
pub fn devices(args: &ClientArgs) -> Result<(), CliError> {
    let none: Option<&()> = None;
    let devices: Vec<DeviceInfo> = client(args)?.call("GET", "/devices", none)?;
    if args.json {
        return print_json(&devices);
    }
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                d.address.clone(),
                format!("{:04x}:{:04x}", d.vendor, d.device),
                format!("{:06x}", d.class),
                d.numa_node.map_or("-".into(), |n| n.to_string()),
                d.driver.clone().unwrap_or_else(|| "-".into()),
                d.iommu_group.map_or("-".into(), |g| g.to_string()),
                d.owner.clone().unwrap_or_else(|| "-".into()),
                match &d.not_assignable {
                    None => "yes".into(),
                    Some(why) => format!("no: {why}"),
                },
            ]
        })
        .collect();
    print_table(
        &[
            "ADDRESS",
            "ID",
            "CLASS",
            "NODE",
            "DRIVER",
            "GROUP",
            "OWNER",
            "ASSIGNABLE",
        ],
        &rows,
    );
    Ok(())
}

pub fn model(args: &ClientArgs, command: &ModelCommand) -> Result<(), CliError> {
    let client = client(args)?;
    let none: Option<&()> = None;
    match command {
        ModelCommand::List => {
            let models: Vec<ModelInfo> = client.call("GET", "/models", none)?;
            if args.json {
                return print_json(&models);
            }
            let rows: Vec<Vec<String>> = models
                .iter()
                .map(|m| {
                    vec![
                        m.name.clone(),
                        m.architecture.clone(),
                        m.quantization.clone(),
                        format!("{:.1}M", m.parameters as f64 / 1e6),
                        format!("{} MiB", m.size_bytes >> 20),
                        m.context_length.to_string(),
                        if m.used_by.is_empty() {
                            "-".into()
                        } else {
                            m.used_by.join(",")
                        },
                        m.path.clone(),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME", "ARCH", "QUANT", "PARAMS", "SIZE", "CONTEXT", "USED BY", "PATH",
                ],
                &rows,
            );
            Ok(())
        }
        ModelCommand::Register { name, path } => {
            let path = std::path::absolute(path)?;
            let registration = ModelRegistration {
                name: name.clone(),
                path: path.display().to_string(),
            };
            let info: ModelInfo = client.call("POST", "/models", Some(&registration))?;
            if args.json {
                print_json(&info)
            } else {
                println!(
                    "{}: {} {} ({} MiB)",
                    info.name,
                    info.architecture,
                    info.quantization,
                    info.size_bytes >> 20
                );
                Ok(())
            }
        }
        ModelCommand::Swap {
            partition,
            model,
            ctx_size,
        } => {
            let swap = ModelSwap {
                model: model.clone(),
                context_length: *ctx_size,
            };
            let info: PartitionInfo = client.call(
                "PUT",
                &format!("/partitions/{partition}/model"),
                Some(&swap),
            )?;
            show_partition(args, &info)
        }
    }
}

pub fn complete(args: &ClientArgs, complete: &CompleteArgs) -> Result<(), CliError> {
    let client = client(args)?;
    let request = CompletionRequest {
        prompt: complete.prompt.clone(),
        chat: complete.chat,
        max_tokens: complete.max_tokens,
        sampling: Sampling {
            temperature: complete.temperature,
            seed: complete.seed,
            ..Sampling::default()
        },
        stop: complete.stop.clone(),
        ignore_eos: false,
        stream: true,
    };
    let mut stdout = std::io::stdout().lock();
    let mut outcome: Result<Option<CompletionResult>, CliError> = Ok(None);
    client.stream(
        &format!("/partitions/{}/completions", complete.partition),
        &request,
        &mut |event| match event.event.as_str() {
            "token" => {
                if let Ok(token) = serde_json::from_str::<TokenEvent>(&event.data) {
                    if !args.json {
                        let _ = stdout.write_all(token.text.as_bytes());
                        let _ = stdout.flush();
                    }
                }
            }
            "done" => match serde_json::from_str::<CompletionResult>(&event.data) {
                Ok(result) => outcome = Ok(Some(result)),
                Err(e) => outcome = Err(CliError::Completion(format!("bad done event: {e}"))),
            },
            "error" => {
                let message = serde_json::from_str::<ErrorBody>(&event.data)
                    .map(|body| body.error.message)
                    .unwrap_or(event.data);
                outcome = Err(CliError::Completion(message));
            }
            _ => {}
        },
    )?;
    let result =
        outcome?.ok_or_else(|| CliError::Completion("the stream ended without a result".into()))?;
    if args.json {
        return print_json(&result);
    }
    writeln!(stdout)?;
    eprintln!(
        "[{}: {} prompt tokens ({} reused), {} tokens, ttft {:.1} ms, {:.1} tok/s, finish: {:?}]",
        result.partition,
        result.prompt_tokens,
        result.prompt_tokens_reused,
        result.completion_tokens,
        result.ttft_ms,
        result.tokens_per_sec,
        result.finish_reason
    );
    Ok(())
}

pub fn stats(args: &ClientArgs) -> Result<(), CliError> {
    let client = client(args)?;
    let none: Option<&()> = None;
    let stats: Stats = client.call("GET", "/stats", none)?;
    if args.json {
        return print_json(&stats);
    }
    let rows: Vec<Vec<String>> = stats
        .partitions
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.state.as_str().into(),
                p.model.clone(),
                p.counters.requests.to_string(),
                p.counters.tokens_generated.to_string(),
                format!("{:.1}", p.tokens_per_sec),
                format!("{:.1}", p.ttft_ms.p50),
                format!("{:.2}", p.token_latency_ms.p50),
                format!("{:.2}", p.token_latency_ms.p99),
                format!("{:.2}", p.jitter_ms),
                p.counters.vcpu_exits.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "STATE",
            "MODEL",
            "REQUESTS",
            "TOKENS",
            "TOK/S",
            "TTFT P50 MS",
            "TOKEN P50 MS",
            "TOKEN P99 MS",
            "JITTER MS",
            "EXITS",
        ],
        &rows,
    );
    Ok(())
}

pub fn health(args: &ClientArgs) -> Result<(), CliError> {
    let client = client(args)?;
    let none: Option<&()> = None;
    let health: Health = client.call("GET", "/health", none)?;
    let version: Version = client.call("GET", "/version", none)?;
    if args.json {
        return print_json(&serde_json::json!({ "health": health, "version": version }));
    }
    println!(
        "{}: aivmm {} (API {}, guest ABI {}), {} partition(s), {} running, up {}",
        health.status,
        version.version,
        version.api_version,
        version.guest_abi,
        health.partitions,
        health.partitions_running,
        uptime(Some(health.uptime_secs))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(subcommand)]
        partition: PartitionCommand,
    }

    fn create(args: &[&str]) -> Result<CreateArgs, clap::Error> {
        let argv = ["aivmm", "create"].iter().chain(args).copied();
        match Command::try_parse_from(argv)?.partition {
            PartitionCommand::Create(create) => Ok(*create),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn linux_partitions_take_a_kernel_and_devices_instead_of_a_model() {
        let lx = create(&[
            "lx",
            "--kernel",
            "/boot/vmlinuz",
            "--cmdline",
            "console=ttyS0",
            "--boot-protocol",
            "linux64",
            "--device",
            "0000:17:00.0",
            "--device",
            "0000:ca:00.0",
            "--disk",
            "/srv/root.img",
            "--disk",
            "/srv/data.img,ro",
        ])
        .unwrap();
        assert_eq!(
            lx.disks
                .iter()
                .map(|d| (d.path.display().to_string(), d.read_only))
                .collect::<Vec<_>>(),
            [
                ("/srv/root.img".into(), false),
                ("/srv/data.img".into(), true)
            ]
        );
        assert_eq!(
            lx.kernel.as_deref(),
            Some(std::path::Path::new("/boot/vmlinuz"))
        );
        assert_eq!(lx.boot_protocol, BootProtocol::Linux64);
        assert_eq!(lx.devices, ["0000:17:00.0", "0000:ca:00.0"]);
        assert_eq!(lx.model, None);
        assert_eq!(create(&["m"]).unwrap().boot_protocol, BootProtocol::Auto);
        for bad in [
            &["x", "--kernel", "/k", "--model", "tiny"][..],
            &["x", "--device", "0000:17:00.0"],
            &["x", "--initrd", "/i"],
            &["x", "--disk", "/d.img"],
            &["x", "--kernel", "/k", "--disk", "/d.img,rx"],
            &["x", "--kernel", "/k", "--boot-protocol", "efi"],
        ] {
            assert!(create(bad).is_err(), "{bad:?}");
        }
    }
}
