//! `aivmm serve` driven by real clients: curl over the Unix socket, the
//! `openai` Python package over TCP with a bearer token, the project's own
//! client, and Prometheus' text parser. Partitions are real KVM partitions.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aivmm::daemon::{self, ServeArgs, ServeError};
use aivmm::host_engine::MappedModel;
use aivmm_api::client::{Client, SseEvent};
use aivmm_api::types::*;
use aivmm_engine::chat::{ChatTemplate, Message, Role};
use serde_json::{json, Value};

/// Two cores: the daemon tests take turns (each boots up to two partitions).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const TOKEN: &str = "test-token-0123456789abcdef";
const PROMPT: &str = "The three primary colors are";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "aivmm-daemon-{}-{name}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny(name: &str) -> PathBuf {
    common::fixtures()
        .join("models")
        .join(format!("{name}.gguf"))
}

/// A daemon in this process, on its own socket; stopped on drop.
struct Daemon {
    dir: PathBuf,
    /// Removed when the daemon stops (not when it is restarted).
    remove_dir: bool,
    models: Vec<(String, PathBuf)>,
    socket: PathBuf,
    tcp: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
}

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

impl Daemon {
    fn start(name: &str, models: &[(&str, PathBuf)], tcp: bool) -> Daemon {
        let models = models
            .iter()
            .map(|(name, path)| (name.to_string(), path.clone()))
            .collect();
        Daemon::start_in(scratch_dir(name), models, tcp)
    }

    /// Stops this daemon and starts another on the same socket, state file
    /// and models.
    fn restart(mut self) -> Daemon {
        self.stop_and_join();
        self.remove_dir = false;
        let tcp = self.tcp.is_some();
        Daemon::start_in(self.dir.clone(), std::mem::take(&mut self.models), tcp)
    }

    fn start_in(dir: PathBuf, models: Vec<(String, PathBuf)>, tcp: bool) -> Daemon {
        let socket = dir.join("api.sock");
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let tcp = tcp.then(free_port);
        let model_dir = dir.join("models");
        std::fs::create_dir_all(&model_dir).unwrap();
        let args = ServeArgs {
            api_sock: socket.clone(),
            listen: tcp,
            token_file: tcp.map(|_| token_file),
            model_dir: Some(model_dir),
            models: models.clone(),
            max_body_bytes: 1 << 20,
            host_cpus: None,
            state_file: None,
            sysfs_root: PathBuf::from("/"),
            no_cgroup: false,
            no_seccomp: false,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            daemon::serve(args, async move {
                let _ = stopped.await;
            })
        });
        let daemon = Daemon {
            dir,
            remove_dir: true,
            models,
            socket,
            tcp,
            stop: Some(stop),
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if daemon.socket.exists() {
                if let Ok((200, _)) = daemon.client().raw("GET", "/health", None) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the daemon did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    fn client(&self) -> Client {
        Client::new(&self.socket).unwrap()
    }

    fn url(&self) -> String {
        format!("http://{}", self.tcp.expect("started with TCP"))
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, bytes) = self
            .client()
            .raw(method, path, body.map(|b| b.to_string().into_bytes()))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{method} {path}: not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, value)
    }

    fn create(&self, id: &str, model: &str) -> PartitionInfo {
        let (status, body) = self.call(
            "POST",
            "/partitions",
            Some(json!({"id": id, "model": model, "vcpus": 1})),
        );
        assert_eq!(status, 201, "create {id}: {body}");
        serde_json::from_value(body).unwrap()
    }

    /// curl over the Unix socket: (HTTP status, body).
    fn curl(&self, method: &str, path: &str, body: Option<&str>, extra: &[&str]) -> (u16, String) {
        let mut command = Command::new("curl");
        command
            .args(["-sS", "-N", "--unix-socket"])
            .arg(&self.socket)
            .args(["-X", method, "-w", "\n%{http_code}"])
            .args(extra);
        if let Some(body) = body {
            command.args(["-H", "Content-Type: application/json", "-d", body]);
        }
        command.arg(format!("http://localhost{path}"));
        let out = command
            .output()
            .expect("curl runs (tests/api/setup.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_and_join();
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Daemon {
    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => eprintln!("daemon ended with an error: {error}"),
                Err(_) => {
                    if !std::thread::panicking() {
                        panic!("the daemon thread panicked")
                    }
                }
            }
        }
    }
}

/// Greedy text of the host engine for `text` (the reference `aivmm run` equals,
/// as the partition tests show).
fn host_greedy_text(model_path: &Path, text: &str, max_tokens: usize) -> String {
    common::with_greedy_host_engine(model_path, 0, max_tokens, false, |engine| {
        let prompt = engine.tokenize_prompt(text);
        let mut out = String::new();
        engine
            .complete(&prompt, &mut |piece| out.push_str(piece))
            .unwrap();
        out
    })
}

fn chat_text(model_path: &Path, user: &str) -> String {
    let mapped = MappedModel::open(model_path).unwrap();
    let gguf = mapped.parse().unwrap();
    let model = mapped.load(&gguf).unwrap();
    ChatTemplate::for_model(&gguf, model.config.arch).render(
        &[Message {
            role: Role::User,
            content: user,
        }],
        true,
    )
}

fn parse_sse(body: &str) -> Vec<SseEvent> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut event = SseEvent {
                event: String::new(),
                data: String::new(),
            };
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event.event = name.into();
                } else if let Some(data) = line.strip_prefix("data: ") {
                    event.data = data.into();
                }
            }
            (!event.data.is_empty()).then_some(event)
        })
        .collect()
}

fn streamed_text(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.event == "token")
        .map(|e| serde_json::from_str::<TokenEvent>(&e.data).unwrap().text)
        .collect()
}

/// The Python of tests/api/setup.sh's venv (openai, prometheus_client,
/// schemathesis), or None outside CI when it cannot be set up.
fn api_python(test: &str) -> Option<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let python = PYTHON.get_or_init(|| {
        if let Some(python) = std::env::var_os("AIVMM_API_PYTHON") {
            return Ok(PathBuf::from(python));
        }
        let out = Command::new("bash")
            .arg(common::repo_root().join("tests/api/setup.sh"))
            .output()
            .map_err(|e| format!("cannot run tests/api/setup.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tests/api/setup.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    match python {
        Ok(python) => Some(python.clone()),
        Err(why) if common::in_ci() => panic!("{test}: {why}"),
        Err(why) => {
            eprintln!("{test}: SKIPPED the Python clients: {why}");
            None
        }
    }
}

#[test]
fn curl_and_the_openai_client_get_the_greedy_output_of_aivmm_run() {
    let name = "curl_and_the_openai_client_get_the_greedy_output_of_aivmm_run";
    if !common::kvm_available(name) {
        return;
    }
    let _serial = serial();
    let gemma = common::default_model();
    let daemon = Daemon::start("openai", &[("gemma", gemma.clone())], true);
    let n = 24;
    let expected = host_greedy_text(&gemma, PROMPT, n);
    let expected_chat = host_greedy_text(&gemma, &chat_text(&gemma, PROMPT), n);

    // curl: create, complete (whole and streamed), read.
    let (status, body) = daemon.curl(
        "POST",
        "/partitions",
        Some(r#"{"id": "g", "model": "gemma", "vcpus": 1}"#),
        &[],
    );
    assert_eq!(status, 201, "{body}");
    let request =
        json!({"prompt": PROMPT, "max_tokens": n, "sampling": {"temperature": 0}, "stream": false});
    let (status, body) = daemon.curl(
        "POST",
        "/partitions/g/completions",
        Some(&request.to_string()),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    let result: CompletionResult = serde_json::from_str(&body).unwrap();
    assert_eq!(result.text, expected, "curl, whole answer");
    assert_eq!(result.model, "gemma");
    let request = json!({"prompt": PROMPT, "max_tokens": n, "sampling": {"temperature": 0}});
    let (status, body) = daemon.curl(
        "POST",
        "/partitions/g/completions",
        Some(&request.to_string()),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    let events = parse_sse(&body);
    assert_eq!(streamed_text(&events), expected, "curl, streamed");
    let last = events.last().unwrap();
    assert_eq!(last.event, "done", "{body}");
    let done: CompletionResult = serde_json::from_str(&last.data).unwrap();
    assert_eq!(done.text, expected);
    assert_eq!(
        done.prompt_tokens_reused + done.prompt_tokens_processed,
        done.prompt_tokens
    );
    assert!(
        done.prompt_tokens_reused > 0,
        "the second identical prompt reuses the cache"
    );

    // The project's client: the same through the `aivmm complete` path.
    let mut text = String::new();
    let mut finish = None;
    daemon
        .client()
        .stream(
            "/partitions/g/completions",
            &CompletionRequest {
                prompt: PROMPT.into(),
                chat: true,
                max_tokens: n as u32,
                sampling: Sampling::greedy(),
                stop: Vec::new(),
                ignore_eos: false,
                stream: true,
            },
            &mut |event| match event.event.as_str() {
                "token" => text.push_str(
                    &serde_json::from_str::<TokenEvent>(&event.data)
                        .unwrap()
                        .text,
                ),
                "done" => {
                    finish = Some(serde_json::from_str::<CompletionResult>(&event.data).unwrap())
                }
                other => panic!("unexpected event {other}: {}", event.data),
            },
        )
        .unwrap();
    assert_eq!(text, expected_chat, "chat through the native route");
    assert!(finish.is_some());

    // The openai package over TCP with the bearer token.
    if let Some(python) = api_python(name) {
        let out = Command::new(&python)
            .arg(common::repo_root().join("tests/api/openai_client.py"))
            .args([
                &format!("{}/v1", daemon.url()),
                TOKEN,
                "gemma",
                PROMPT,
                &n.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openai_client.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answers: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            answers["completion"],
            expected.as_str(),
            "openai completions"
        );
        assert_eq!(
            answers["completion_stream"],
            expected.as_str(),
            "openai completions, streamed"
        );
        assert_eq!(answers["chat"], expected_chat.as_str(), "openai chat");
        assert_eq!(
            answers["chat_stream"],
            expected_chat.as_str(),
            "openai chat, streamed"
        );
        assert_eq!(
            answers["chat_usage_completion_tokens"], n,
            "max_tokens reached: {answers}"
        );
        assert_eq!(answers["not_found_status"], 404);
        assert_eq!(answers["unauthorized_status"], 401);
        assert!(answers["models"]
            .as_array()
            .unwrap()
            .contains(&json!("gemma")));

        // /metrics through Prometheus' own parser.
        let (status, metrics) = daemon.curl("GET", "/metrics", None, &[]);
        assert_eq!(status, 200);
        let metrics_file = daemon.dir.join("metrics.txt");
        std::fs::write(&metrics_file, &metrics).unwrap();
        let out = Command::new(&python)
            .arg(common::repo_root().join("tests/api/parse_metrics.py"))
            .arg(&metrics_file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "prometheus_client rejected /metrics: {}\n{metrics}",
            String::from_utf8_lossy(&out.stderr)
        );
        let families: Value = serde_json::from_slice(&out.stdout).unwrap();
        for family in [
            "aivmm_tokens_generated",
            "aivmm_time_to_first_token_seconds",
            "aivmm_token_latency_seconds",
            "aivmm_queue_depth",
            "aivmm_vcpu_exits",
            "aivmm_guest_memory_bytes",
            "aivmm_partition_state",
            "aivmm_tokens_per_second",
        ] {
            assert!(
                families.get(family).is_some(),
                "{family} missing from {families}"
            );
        }
        // 2 curl + 1 native chat + 4 openai completions of n tokens each.
        assert_eq!(families["aivmm_tokens_generated"]["g"], json!(7 * n));
    }
    let (status, _) = daemon.curl("DELETE", "/partitions/g", None, &[]);
    assert_eq!(status, 204);
}

/// Reads a streamed completion on its own connection, recording when the
/// first token arrived.
fn stream_in_background(
    socket: PathBuf,
    partition: &str,
    request: CompletionRequest,
    first_token: std::sync::mpsc::Sender<()>,
) -> JoinHandle<Vec<SseEvent>> {
    let path = format!("/partitions/{partition}/completions");
    std::thread::spawn(move || {
        let mut events = Vec::new();
        let mut told = false;
        Client::new(&socket)
            .unwrap()
            .stream(&path, &request, &mut |event| {
                if event.event == "token" && !told {
                    told = true;
                    let _ = first_token.send(());
                }
                events.push(event);
            })
            .unwrap();
        events
    })
}

fn greedy_request(prompt: &str, max_tokens: u32, ignore_eos: bool) -> CompletionRequest {
    CompletionRequest {
        prompt: prompt.into(),
        chat: false,
        max_tokens,
        sampling: Sampling::greedy(),
        stop: Vec::new(),
        ignore_eos,
        stream: true,
    }
}

#[test]
fn two_partitions_serve_at_once_and_a_model_swap_disturbs_neither() {
    let name = "two_partitions_serve_at_once_and_a_model_swap_disturbs_neither";
    if !common::kvm_available(name) {
        return;
    }
    let _serial = serial();
    let gemma = common::default_model();
    let daemon = Daemon::start(
        "swap",
        &[
            ("gemma", gemma.clone()),
            ("tiny-llama", tiny("tiny-llama-f16")),
            ("tiny-qwen2", tiny("tiny-qwen2-f16")),
        ],
        false,
    );
    let long = daemon.create("long", "gemma");
    let swapped = daemon.create("swapped", "tiny-llama");
    assert_ne!(
        long.host_cpus, swapped.host_cpus,
        "each partition has its own core"
    );
    // These machines have two cores: a third partition is refused, naming why.
    if aivmm::run::online_cpus().map_or(false, |cpus| cpus.len() == 2) {
        let third = json!({"id": "third", "model": "tiny-llama"});
        let (status, body) = daemon.call("POST", "/partitions", Some(third));
        assert_error(
            "a third partition on two cores",
            (status, body.clone()),
            503,
            "resources_exhausted",
            None,
        );
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("cores"),
            "the refusal names the exhausted resource: {message}"
        );
    }
    let n = 64;
    let expected_long = host_greedy_text(&gemma, PROMPT, n);

    let (first_token, got_first) = std::sync::mpsc::channel();
    let reader = stream_in_background(
        daemon.socket.clone(),
        "long",
        greedy_request(PROMPT, n as u32, false),
        first_token,
    );
    got_first.recv_timeout(Duration::from_secs(60)).unwrap();

    // While `long` streams: a refused swap keeps the old model serving ...
    let not_a_model = daemon.dir.join("not-a-model.gguf");
    std::fs::write(&not_a_model, b"this is not a GGUF file").unwrap();
    let (status, body) = daemon.call(
        "PUT",
        "/partitions/swapped/model",
        Some(json!({"model": not_a_model.display().to_string()})),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    let tiny_prompt = "Hello world";
    let before = host_greedy_text(&tiny("tiny-llama-f16"), tiny_prompt, 16);
    let (status, body) = daemon.call(
        "POST",
        "/partitions/swapped/completions",
        Some(json!({"prompt": tiny_prompt, "max_tokens": 16, "sampling": {"temperature": 0}, "stream": false})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"], before.as_str());
    assert_eq!(body["model"], "tiny-llama");

    // ... and a real swap replaces it.
    let (status, body) = daemon.call(
        "PUT",
        "/partitions/swapped/model",
        Some(json!({"model": "tiny-qwen2"})),
    );
    assert_eq!(status, 200, "{body}");
    let info: PartitionInfo = serde_json::from_value(body).unwrap();
    assert_eq!(info.model, "tiny-qwen2");
    assert_eq!(info.state, PartitionState::Running);
    assert_eq!(
        info.host_cpus, swapped.host_cpus,
        "a swap keeps the partition's cores"
    );
    assert_eq!(info.counters.boots, 2);
    let after = host_greedy_text(&tiny("tiny-qwen2-f16"), tiny_prompt, 16);
    let (status, body) = daemon.call(
        "POST",
        "/partitions/swapped/completions",
        Some(json!({"prompt": tiny_prompt, "max_tokens": 16, "sampling": {"temperature": 0}, "stream": false})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"], after.as_str());
    assert_eq!(body["model"], "tiny-qwen2");

    // Several completions at once on one partition queue and all finish.
    let socket = daemon.socket.clone();
    let queued: Vec<JoinHandle<(u16, Vec<u8>)>> = (0..4)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let body = json!({"prompt": tiny_prompt, "max_tokens": 16, "sampling": {"temperature": 0}, "stream": false});
                Client::new(&socket)
                    .unwrap()
                    .raw("POST", "/partitions/swapped/completions", Some(body.to_string().into_bytes()))
                    .unwrap()
            })
        })
        .collect();
    for handle in queued {
        let (status, bytes) = handle.join().unwrap();
        assert_eq!(status, 200);
        let result: CompletionResult = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(result.text, after);
    }

    // The long stream was not disturbed.
    let events = reader.join().unwrap();
    assert!(events.iter().all(|e| e.event != "error"), "{events:?}");
    assert_eq!(streamed_text(&events), expected_long);

    let models: Vec<ModelInfo> = daemon.client().call("GET", "/models", None::<&()>).unwrap();
    let used = |name: &str| {
        models
            .iter()
            .find(|m| m.name == name)
            .unwrap()
            .used_by
            .clone()
    };
    assert_eq!(used("gemma"), vec!["long".to_string()]);
    assert_eq!(used("tiny-qwen2"), vec!["swapped".to_string()]);
    assert!(used("tiny-llama").is_empty());
    let gemma_info = models.iter().find(|m| m.name == "gemma").unwrap();
    assert_eq!(gemma_info.architecture, "gemma3");
    assert_eq!(gemma_info.quantization, "Q4_K_M");
    assert!(
        gemma_info.context_length > 0 && gemma_info.parameters > 0,
        "{gemma_info:?}"
    );
}

#[test]
fn deleting_a_partition_mid_stream_ends_its_stream_with_an_error_and_the_daemon_goes_on() {
    let name =
        "deleting_a_partition_mid_stream_ends_its_stream_with_an_error_and_the_daemon_goes_on";
    if !common::kvm_available(name) {
        return;
    }
    let _serial = serial();
    let gemma = common::default_model();
    let daemon = Daemon::start(
        "delete",
        &[
            ("gemma", gemma.clone()),
            ("tiny-llama", tiny("tiny-llama-f16")),
        ],
        false,
    );
    daemon.create("doomed", "gemma");
    daemon.create("other", "tiny-llama");
    let (first_token, got_first) = std::sync::mpsc::channel();
    let reader = stream_in_background(
        daemon.socket.clone(),
        "doomed",
        greedy_request(PROMPT, 2000, true),
        first_token,
    );
    got_first.recv_timeout(Duration::from_secs(60)).unwrap();
    let (status, body) = daemon.call("DELETE", "/partitions/doomed", None);
    assert_eq!(status, 204, "{body}");
    let events = reader.join().unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        last.event, "error",
        "the stream ends with an error event: {events:?}"
    );
    let error: ErrorBody = serde_json::from_str(&last.data).unwrap();
    assert_eq!(error.error.code, "partition_gone", "{}", last.data);
    assert!(streamed_text(&events).len() > 0);

    let (status, body) = daemon.call("GET", "/partitions/doomed", None);
    assert_eq!(status, 404, "{body}");
    let (status, health) = daemon.call("GET", "/health", None);
    assert_eq!(status, 200);
    assert_eq!(health["partitions"], 1);
    let (status, body) = daemon.call(
        "POST",
        "/partitions/other/completions",
        Some(json!({"prompt": "Hello", "max_tokens": 8, "stream": false})),
    );
    assert_eq!(status, 200, "the other partition still serves: {body}");

    // Its core is free again.
    daemon.create("again", "tiny-llama");
}

#[test]
fn a_closed_connection_cancels_its_completion() {
    let name = "a_closed_connection_cancels_its_completion";
    if !common::kvm_available(name) {
        return;
    }
    let _serial = serial();
    let gemma = common::default_model();
    let daemon = Daemon::start("cancel", &[("gemma", gemma.clone())], false);
    daemon.create("g", "gemma");
    // A raw HTTP/1.1 client that reads the first token and hangs up.
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let body = json!({"prompt": PROMPT, "max_tokens": 4000, "ignore_eos": true, "sampling": {"temperature": 0}}).to_string();
    write!(
        stream,
        "POST /partitions/g/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: token") {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the daemon closed the stream: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(60);
    let stats = loop {
        let stats: Stats = daemon.client().call("GET", "/stats", None::<&()>).unwrap();
        if stats.partitions[0].counters.requests_cancelled == 1 {
            break stats;
        }
        assert!(
            Instant::now() < deadline,
            "the completion was not cancelled: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let counters = &stats.partitions[0].counters;
    assert!(counters.tokens_generated < 4000, "{counters:?}");
    assert_eq!(counters.queue_depth, 0);
    // The partition serves the next request as if nothing happened.
    let expected = host_greedy_text(&gemma, PROMPT, 8);
    let (status, body) = daemon.call(
        "POST",
        "/partitions/g/completions",
        Some(json!({"prompt": PROMPT, "max_tokens": 8, "sampling": {"temperature": 0}, "stream": false})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"], expected.as_str());
}

fn assert_error(
    what: &str,
    (status, body): (u16, Value),
    want_status: u16,
    code: &str,
    param: Option<&str>,
) {
    assert_eq!(status, want_status, "{what}: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    assert!(body["error"]["type"].is_string(), "{what}: {body}");
    if let Some(param) = param {
        assert_eq!(body["error"]["param"], param, "{what}: {body}");
    }
}

#[test]
fn bad_requests_are_refused_with_4xx_naming_the_field() {
    let name = "bad_requests_are_refused_with_4xx_naming_the_field";
    if !common::kvm_available(name) {
        return;
    }
    let _serial = serial();
    let daemon = Daemon::start("bad", &[("tiny", tiny("tiny-llama-f16"))], true);
    let post = |path: &str, body: Value| daemon.call("POST", path, Some(body));
    assert_error(
        "unknown field",
        post(
            "/partitions",
            json!({"id": "x", "model": "tiny", "colour": "red"}),
        ),
        400,
        "unknown_field",
        Some("colour"),
    );
    assert_error(
        "bad id",
        post("/partitions", json!({"id": "Bad Id", "model": "tiny"})),
        400,
        "invalid_request",
        Some("id"),
    );
    assert_error(
        "missing model",
        post("/partitions", json!({"id": "x"})),
        400,
        "invalid_request",
        Some("model"),
    );
    assert_error(
        "wrong type",
        post(
            "/partitions",
            json!({"id": "x", "model": "tiny", "vcpus": "two"}),
        ),
        400,
        "invalid_request",
        Some("vcpus"),
    );
    assert_error(
        "zero vCPUs",
        post(
            "/partitions",
            json!({"id": "x", "model": "tiny", "vcpus": 0}),
        ),
        400,
        "invalid_request",
        Some("vcpus"),
    );
    assert_error(
        "unknown model",
        post("/partitions", json!({"id": "x", "model": "nope"})),
        404,
        "not_found",
        Some("model"),
    );
    assert_error(
        "too little memory",
        post(
            "/partitions",
            json!({"id": "x", "model": "tiny", "memory_mib": 1}),
        ),
        400,
        "invalid_request",
        Some("memory_mib"),
    );
    assert_error(
        "context longer than the model's",
        post(
            "/partitions",
            json!({"id": "x", "model": "tiny", "context_length": 1000000}),
        ),
        400,
        "invalid_request",
        Some("context_length"),
    );
    assert_error(
        "a core that does not exist",
        post(
            "/partitions",
            json!({"id": "x", "model": "tiny", "cores": [4095]}),
        ),
        400,
        "invalid_request",
        Some("cores"),
    );
    let (status, bytes) = daemon
        .client()
        .raw("POST", "/partitions", Some(b"{not json".to_vec()))
        .unwrap();
    assert_error(
        "bad JSON",
        (status, serde_json::from_slice(&bytes).unwrap()),
        400,
        "invalid_request",
        None,
    );
    // A body over the limit is refused from its Content-Length, before it is
    // read (curl waits for that answer instead of sending all of it).
    let big = daemon.dir.join("big.json");
    std::fs::write(&big, vec![b' '; 2 << 20]).unwrap();
    let (status, body) = daemon.curl(
        "POST",
        "/partitions",
        None,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!("@{}", big.display()),
        ],
    );
    assert_error(
        "a 2 MiB body",
        (status, serde_json::from_str(&body).unwrap()),
        413,
        "payload_too_large",
        None,
    );
    assert_error(
        "unknown route",
        daemon.call("GET", "/nowhere", None),
        404,
        "not_found",
        None,
    );
    assert_error(
        "wrong method",
        daemon.call("DELETE", "/health", None),
        405,
        "method_not_allowed",
        None,
    );
    assert_error(
        "completion for a missing partition",
        post("/partitions/ghost/completions", json!({"prompt": "hi"})),
        404,
        "not_found",
        None,
    );
    daemon.create("p", "tiny");
    assert_error(
        "same id twice",
        post("/partitions", json!({"id": "p", "model": "tiny"})),
        409,
        "already_exists",
        None,
    );
    assert_error(
        "bad sampling",
        post(
            "/partitions/p/completions",
            json!({"prompt": "hi", "sampling": {"top_p": 2.0}}),
        ),
        400,
        "invalid_request",
        Some("sampling.top_p"),
    );
    assert_error(
        "unknown sampling field",
        post(
            "/partitions/p/completions",
            json!({"prompt": "hi", "sampling": {"tempreature": 0}}),
        ),
        400,
        "unknown_field",
        Some("sampling.tempreature"),
    );
    assert_error(
        "OpenAI n > 1",
        post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "hi", "n": 2}),
        ),
        400,
        "unsupported",
        Some("n"),
    );
    assert_error(
        "OpenAI unknown field",
        post(
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [], "tools": []}),
        ),
        400,
        "unknown_field",
        Some("tools"),
    );
    assert_error(
        "OpenAI model nobody serves",
        post(
            "/v1/completions",
            json!({"model": "nobody", "prompt": "hi"}),
        ),
        404,
        "not_found",
        Some("model"),
    );
    // A stopped partition refuses completions until started again.
    let (status, _) = daemon.call("POST", "/partitions/p/stop", None);
    assert_eq!(status, 200);
    assert_error(
        "completion on a stopped partition",
        post("/partitions/p/completions", json!({"prompt": "hi"})),
        409,
        "conflict",
        None,
    );
    let (status, body) = daemon.call("POST", "/partitions/p/start", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "running");
    assert_eq!(body["counters"]["boots"], 2);

    // TCP needs the bearer token.
    let url = format!("{}/health", daemon.url());
    let status_of = |extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(status_of(&[]), "401");
    assert_eq!(
        status_of(&["-H", "Authorization: Bearer wrong-token-0123456789"]),
        "401"
    );
    assert_eq!(
        status_of(&["-H", &format!("Authorization: Bearer {TOKEN}")]),
        "200"
    );

    let (status, health) = daemon.call("GET", "/health", None);
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
}

#[test]
fn the_api_socket_is_private_stale_sockets_are_replaced_and_a_second_daemon_is_refused() {
    let name =
        "the_api_socket_is_private_stale_sockets_are_replaced_and_a_second_daemon_is_refused";
    if !common::kvm_available(name) {
        return;
    }
    let dir = scratch_dir("socket");
    let socket = dir.join("api.sock");
    // A socket file left by a daemon that died.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let args = |socket: &Path| ServeArgs {
        api_sock: socket.to_path_buf(),
        listen: None,
        token_file: None,
        model_dir: Some(dir.join("no-models")),
        models: Vec::new(),
        max_body_bytes: 1 << 20,
        host_cpus: None,
        state_file: None,
        sysfs_root: PathBuf::from("/"),
        no_cgroup: false,
        no_seccomp: false,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first_args = args(&socket);
    let first = std::thread::spawn(move || {
        daemon::serve(first_args, async move {
            let _ = stopped.await;
        })
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while Client::new(&socket)
        .unwrap()
        .raw("GET", "/health", None)
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the daemon did not replace the stale socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the API socket is private");

    let second = daemon::serve(args(&socket), async {});
    let error = second.expect_err("a second daemon on the same socket is refused");
    assert!(
        error.to_string().contains("another aivmm daemon"),
        "{error}"
    );
    // The first daemon is unharmed.
    assert_eq!(
        Client::new(&socket)
            .unwrap()
            .raw("GET", "/health", None)
            .unwrap()
            .0,
        200
    );

    // A file that is not a socket is never replaced.
    let file = dir.join("precious");
    std::fs::write(&file, b"data").unwrap();
    let error = daemon::serve(args(&file), async {}).expect_err("a non-socket path is refused");
    assert!(error.to_string().contains("not a socket"), "{error}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");

    let _ = stop.send(());
    first.join().unwrap().unwrap();
    assert!(
        !socket.exists(),
        "the socket is removed when the daemon stops"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Schema-driven fuzzing of the whole API from `api/openapi.yaml`
/// (schemathesis, bounded by a fixed number of cases per operation and a
/// fixed seed): no 5xx, no crash, every answer conforming to the document,
/// every schema-violating request refused, bearer auth enforced. Positive
/// acceptance is not checked: the document cannot say that a model file
/// must exist, that memory must hold the model, or that `stream_options`
/// needs `stream`, so some schema-valid requests are rightly refused.
#[test]
fn schemathesis_finds_no_server_error_and_no_crash() {
    let name = "schemathesis_finds_no_server_error_and_no_crash";
    if !common::kvm_available(name) {
        return;
    }
    let Some(python) = api_python(name) else {
        return;
    };
    let _serial = serial();
    // `tiny` is the model of the document's examples, so that partitions are
    // really created, queried, swapped, completed on and deleted.
    let daemon = Daemon::start("fuzz", &[("tiny", tiny("tiny-llama-f16"))], true);
    let schemathesis = python.with_file_name("schemathesis");
    let report = daemon.dir.join("schemathesis");
    let out = Command::new("timeout")
        .arg("600")
        .arg(&schemathesis)
        .arg("run")
        .arg(common::repo_root().join("api/openapi.yaml"))
        .args(["--url", &daemon.url()])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "20", "--seed", "20261130", "--no-shrink"])
        .args(["--request-timeout", "120", "--workers", "1"])
        .arg("--report-dir")
        .arg(&report)
        .current_dir(&daemon.dir)
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .output()
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: String = stdout
        .lines()
        .skip_while(|line| !line.contains("SUMMARY"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("schemathesis:\n{summary}");
    assert!(
        out.status.success(),
        "schemathesis found problems (exit {:?}):\n{stdout}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon is still up and answers.
    let (status, health) = daemon.call("GET", "/health", None);
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
}

#[test]
fn a_restarted_daemon_restores_its_partitions_on_the_same_cores() {
    let name = "a_restarted_daemon_restores_its_partitions_on_the_same_cores";
    if !common::kvm_available(name) {
        return;
    }
    let _serial = serial();
    let model = tiny("tiny-llama-f16");
    let daemon = Daemon::start("restore", &[("tiny", model.clone())], false);
    let running = daemon.create("running", "tiny");
    let (status, body) = daemon.call(
        "POST",
        "/partitions",
        Some(json!({"id": "stopped", "model": "tiny", "start": false})),
    );
    assert_eq!(status, 201, "{body}");
    let stopped: PartitionInfo = serde_json::from_value(body).unwrap();
    assert_eq!(stopped.state, PartitionState::Stopped);

    let daemon = daemon.restart();
    // Restored partitions boot in the background.
    let deadline = Instant::now() + Duration::from_secs(120);
    let restored = loop {
        let (status, body) = daemon.call("GET", "/partitions/running", None);
        assert_eq!(status, 200, "{body}");
        let info: PartitionInfo = serde_json::from_value(body).unwrap();
        if info.state != PartitionState::Starting {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "the restored partition did not boot: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(restored.state, PartitionState::Running, "{restored:?}");
    assert_eq!(
        restored.host_cpus, running.host_cpus,
        "the same cores as before"
    );
    assert_eq!(restored.model, "tiny");
    let (status, body) = daemon.call("GET", "/partitions/stopped", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "stopped", "{body}");
    let expected = host_greedy_text(&model, "Hello world", 8);
    let (status, body) = daemon.call(
        "POST",
        "/partitions/running/completions",
        Some(json!({"prompt": "Hello world", "max_tokens": 8, "sampling": {"temperature": 0}, "stream": false})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"], expected.as_str());

    // A deleted partition stays deleted.
    let (status, _) = daemon.call("DELETE", "/partitions/stopped", None);
    assert_eq!(status, 204);
    let daemon = daemon.restart();
    let (status, _) = daemon.call("GET", "/partitions/stopped", None);
    assert_eq!(status, 404);
    let (status, _) = daemon.call("GET", "/partitions/running", None);
    assert_eq!(status, 200);
}

/// A Linux partition through the daemon: the Debian kernel (as
/// tests/tests/linux_boot.rs boots it) on a placed core, its console read
/// through the API until the kernel's banner, model requests to it refused
/// with 409, a device for a second partition refused with this host's
/// preflight error, and its core free again once it is deleted.
/// AIVMM_LINUX_BOOT_TIMEOUT (seconds, default 180) bounds the wait for the
/// banner: the kernel runs emulated on PVM hosts, so not reaching it in
/// time is reported, not failed, as in linux_boot.rs.
#[test]
fn a_linux_partition_boots_shows_its_console_and_frees_its_core() {
    let name = "a_linux_partition_boots_shows_its_console_and_frees_its_core";
    if !common::kvm_available(name) {
        return;
    }
    let Some(kernel) = common::debian_kernel(name) else {
        return;
    };
    let _serial = serial();
    let daemon = Daemon::start("linux", &[("tiny", tiny("tiny-llama-f16"))], false);

    // Bad kernels are refused naming the file; the daemon goes on.
    let (status, body) = daemon.call(
        "POST",
        "/partitions",
        Some(json!({"id": "bad", "linux": {"kernel": "/nonexistent/vmlinuz"}})),
    );
    assert_error(
        "missing kernel",
        (status, body.clone()),
        400,
        "invalid_request",
        Some("linux.kernel"),
    );
    assert!(body.to_string().contains("/nonexistent/vmlinuz"), "{body}");
    let not_a_kernel = tiny("tiny-llama-f16");
    let (status, body) = daemon.call(
        "POST",
        "/partitions",
        Some(json!({"id": "bad", "linux": {"kernel": not_a_kernel}})),
    );
    assert_error(
        "a GGUF as kernel",
        (status, body.clone()),
        400,
        "invalid_request",
        Some("linux.kernel"),
    );
    assert!(
        body.to_string().contains("is not a Linux kernel image"),
        "{body}"
    );

    // With a disk, on hugepages of the placed node, its threads filtered.
    let disk = std::env::temp_dir().join(format!("aivmm-daemon-disk-{}.img", std::process::id()));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let memory_mib = 256;
    common::host::ensure_free_hugepages(memory_mib / 2, "a Linux partition of 256 MiB");
    let (status, body) = daemon.call(
        "POST",
        "/partitions",
        Some(json!({
            "id": "lx",
            "linux": {"kernel": kernel.vmlinux, "disks": [{"path": disk}]},
            "memory_mib": memory_mib,
            "hugepages": true
        })),
    );
    assert_eq!(status, 201, "create lx: {body}");
    let info: PartitionInfo = serde_json::from_value(body).unwrap();
    assert_eq!(
        (info.kind, info.state, info.host_cpus.len(), info.hugepages),
        (PartitionKind::Linux, PartitionState::Running, 1, true)
    );
    let core = info.host_cpus[0];
    let node = info.numa_node.expect("placed on a node");
    // The daemon runs in this process: its guest RAM and threads are ours.
    let ram = common::host::hugepage_mappings(memory_mib << 20);
    assert_eq!(ram.len(), 1, "one hugepage RAM mapping of 256 MiB: {ram:?}");
    assert_eq!(ram[0].1, memory_mib << 10, "prefaulted in full");
    let numa_maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
    let line = numa_maps
        .lines()
        .find(|line| line.starts_with(&format!("{:x} ", ram[0].0)))
        .expect("the guest RAM is in numa_maps");
    assert!(line.contains(&format!("bind:{node}")), "{line}");

    // The disk is lx's: another partition asking for it is told whose it is.
    let (status, body) = daemon.call(
        "POST",
        "/partitions",
        Some(json!({
            "id": "lx2",
            "linux": {"kernel": kernel.vmlinux, "disks": [{"path": disk, "read_only": true}]},
            "start": false
        })),
    );
    assert_error(
        "a disk of another partition",
        (status, body.clone()),
        409,
        "conflict",
        Some("linux.disks"),
    );
    assert!(body.to_string().contains("partition lx"), "{body}");

    let started = Instant::now();
    let timeout = common::seconds_from_env("AIVMM_LINUX_BOOT_TIMEOUT", 180);
    let banner = loop {
        let (status, body) = daemon.call("GET", "/partitions/lx/console?bytes=65536", None);
        assert_eq!(status, 200, "{body}");
        let tail: ConsoleTail = serde_json::from_value(body).unwrap();
        if tail.text.contains("Linux version") {
            break Some(tail);
        }
        let (_, body) = daemon.call("GET", "/partitions/lx", None);
        let info: PartitionInfo = serde_json::from_value(body).unwrap();
        assert_eq!(
            info.state,
            PartitionState::Running,
            "the guest ended before its banner: {:?}; console: {}",
            info.error,
            tail.text
        );
        if started.elapsed() > timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let seen_after = started.elapsed();
    // Only now, with the guest running for a while: a new thread takes its
    // name (comm) when it first runs, so right after the create the vCPU
    // thread may still carry its parent's.
    let filtered: Vec<(String, String)> = common::host::tasks()
        .into_iter()
        .filter(|task| task.name.starts_with("linux-vcpu") || task.name == "linux-disks")
        .map(|task| (task.name, task.seccomp_mode))
        .collect();
    assert_eq!(filtered.len(), 2, "a vCPU and a disk thread: {filtered:?}");
    assert!(filtered.iter().all(|(_, mode)| mode == "2"), "{filtered:?}");
    // The worker samples the exits every 0.2 s.
    std::thread::sleep(Duration::from_millis(500));
    let (_, body) = daemon.call("GET", "/partitions/lx", None);
    let info: PartitionInfo = serde_json::from_value(body).unwrap();
    let linux = info
        .linux
        .expect("a Linux partition has its guest's status");
    match &banner {
        Some(tail) => {
            eprintln!(
                "{name}: \"Linux version\" on the console after {:.1} s ({} port writes, {} port reads, {} MMIO exits half a second later)",
                seen_after.as_secs_f64(),
                linux.exits.io_out,
                linux.exits.io_in,
                linux.exits.mmio
            );
            assert!(tail.text.contains("Linux version 6."), "{}", tail.text);
            // The banner came through the serial port: port writes, logged whole.
            assert!(linux.exits.io_out > 0, "{linux:?}");
            assert!(linux.console_bytes >= tail.size_bytes, "{linux:?}");
            let (_, body) = daemon.call("GET", "/partitions/lx/console?bytes=16", None);
            let short: ConsoleTail = serde_json::from_value(body).unwrap();
            assert!(short.text.len() <= 16 && short.offset + 16 >= short.size_bytes, "{short:?}");
        }
        None => eprintln!(
            "{name}: no \"Linux version\" within {} s (the kernel runs emulated here); the guest still runs with {:?}",
            timeout.as_secs(),
            linux.exits
        ),
    }
    assert!(linux.cmdline.contains("console=ttyS0"), "{}", linux.cmdline);

    // Model requests go to inference partitions only.
    let (status, body) = daemon.call(
        "POST",
        "/partitions/lx/completions",
        Some(json!({"prompt": "hi", "stream": false})),
    );
    assert_error(
        "completion to a Linux partition",
        (status, body.clone()),
        409,
        "conflict",
        None,
    );
    assert!(body.to_string().contains("runs a Linux guest"), "{body}");
    let (status, body) = daemon.call(
        "PUT",
        "/partitions/lx/model",
        Some(json!({"model": "tiny"})),
    );
    assert_error(
        "model swap on a Linux partition",
        (status, body),
        409,
        "conflict",
        None,
    );
    let (status, body) = daemon.call(
        "POST",
        "/v1/completions",
        Some(json!({"model": "lx", "prompt": "hi", "max_tokens": 1})),
    );
    assert_error(
        "OpenAI completion to a Linux partition",
        (status, body),
        409,
        "conflict",
        None,
    );

    // A device for a second partition: this host's preflight says why not,
    // and the refused partition keeps no core.
    let (status, body) = daemon.call("GET", "/devices", None);
    assert_eq!(status, 200, "{body}");
    let devices: Vec<DeviceInfo> = serde_json::from_value(body).unwrap();
    if let Some(device) = devices.first() {
        assert_eq!(device.owner, None);
        let (status, body) = daemon.call(
            "POST",
            "/partitions",
            Some(json!({
                "id": "gpu",
                "linux": {"kernel": kernel.vmlinux},
                "devices": [device.address],
                "start": false
            })),
        );
        if device.assignable {
            eprintln!(
                "{name}: {} passes the preflight here: {body}",
                device.address
            );
            if status == 201 {
                daemon.call("DELETE", "/partitions/gpu", None);
            }
        } else {
            assert_error(
                "a device that fails the preflight",
                (status, body.clone()),
                400,
                "invalid_request",
                Some("devices"),
            );
            assert!(body.to_string().contains(&device.address), "{body}");
            eprintln!(
                "{name}: {} refused: {}",
                device.address, body["error"]["message"]
            );
        }
        let (_, body) = daemon.call("GET", "/partitions", None);
        let ids: Vec<String> = serde_json::from_value::<Vec<PartitionInfo>>(body)
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, ["lx"]);
    } else {
        eprintln!("{name}: this host has no PCI devices to ask for");
    }

    // Deleting frees the core.
    let (status, body) = daemon.call("DELETE", "/partitions/lx", None);
    assert_eq!(status, 204, "{body}");
    let (status, body) = daemon.call(
        "POST",
        "/partitions",
        Some(json!({"id": "again", "linux": {"kernel": kernel.vmlinux}, "cores": [core], "start": false})),
    );
    assert_eq!(
        status, 201,
        "the core of the deleted partition is free again: {body}"
    );
    let (status, _) = daemon.call("DELETE", "/partitions/again", None);
    assert_eq!(status, 204);
    let _ = std::fs::remove_file(&disk);
}
