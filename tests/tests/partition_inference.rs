//! Real inference inside partitions on /dev/kvm: the guest loads the model
//! from the read-only model window and serves completions through the
//! inference device. Its greedy tokens must equal the host engine's and
//! llama.cpp's (tests/fixtures/reference/), with 1 vCPU and with 2; a chat's
//! second turn must reuse the cached conversation; a model the engine cannot
//! run, a guest fault and too little memory must be reported clearly; and the
//! guest must exit at most once per generated token on average.
//!
//! Without /dev/kvm every KVM test prints why it is skipped, unless CI is set
//! (to anything but "false" or "0"): then a missing /dev/kvm is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use aivmm::host_engine::MappedModel;
use aivmm::inference::{
    plan_memory, Completion, GenerationRequest, InferenceError, InferencePartition, Prompt,
};
use aivmm::partition::{GuestRequests, InferenceSetup, PartitionConfig, PartitionError};
use aivmm::run::{prepare, RunArgs, RunError};
use aivmm_engine::chat::{ChatTemplate, Message, Role};
use aivmm_engine::generate::{Flow, StopReason};
use aivmm_engine::gguf::Gguf;
use aivmm_engine::model::Model;
use aivmm_engine::sampling::SamplerConfig;
use aivmm_guest_abi::debug;
use clap::Parser;
use serde::Deserialize;

const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Greedy tokens compared per prompt on the real model.
const GEMMA_TOKENS: usize = 32;
/// Context of the test partitions: enough for the fixtures, small to warm up.
const N_CTX: usize = 512;

/// Partitions of this file run one at a time: two vCPUs on a two-core machine
/// already fill it.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[derive(Deserialize)]
struct GreedyFixture {
    model: String,
    model_file: String,
    cases: Vec<GreedyCase>,
}

#[derive(Deserialize)]
struct GreedyCase {
    prompt: String,
    prompt_ids: Vec<u32>,
    tokens: Vec<u32>,
}

fn load_fixture(path: &Path) -> GreedyFixture {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A partition serving `model_path` on `vcpus` vCPUs, sized by the host like
/// `aivmm run` does.
fn boot(model_path: &Path, vcpus: u32) -> InferencePartition {
    let mapped = MappedModel::open(model_path).unwrap();
    let gguf = mapped.parse().unwrap();
    let model = mapped.load(&gguf).unwrap();
    let plan = plan_memory(&model, N_CTX, 32, vcpus).unwrap();
    let config = PartitionConfig {
        vcpus,
        memory_bytes: plan.default_bytes,
        stack_bytes: aivmm::inference::STACK_BYTES,
        model: Some(model_path.to_path_buf()),
        inference: Some(plan.setup()),
        ..PartitionConfig::default()
    };
    let partition = InferencePartition::start(config, READY_TIMEOUT)
        .unwrap_or_else(|error| panic!("the partition did not get ready: {error}"));
    let ready = partition.ready();
    eprintln!(
        "{}: {vcpus} vCPU(s), {} MiB: start {:?} (VMM {:?}, guest model load {:?}, session {:?}), warm-up {:?}; guest heap peak {} of {} KiB (planned {} KiB)",
        model_path.display(),
        plan.default_bytes >> 20,
        ready.start(),
        ready.setup,
        ready.model_load,
        ready.session,
        ready.warmup,
        ready.info.heap_peak_bytes >> 10,
        ready.info.heap_bytes >> 10,
        plan.warmup_heap_bytes >> 10,
    );
    assert_eq!(ready.info.workers, vcpus as u64);
    assert_eq!(ready.info.n_ctx, N_CTX as u64);
    assert_eq!(ready.info.session_bytes, plan.session_bytes);
    partition
}

fn greedy(prompt: Prompt<'_>, max_tokens: usize) -> GenerationRequest<'_> {
    GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplerConfig::greedy(),
        stop_at_eog: true,
    }
}

fn run(partition: &mut InferencePartition, request: &GenerationRequest<'_>) -> Completion {
    let mut streamed = String::new();
    let completion = partition
        .generate(request, &mut |piece| {
            streamed.push_str(piece);
            Flow::Continue
        })
        .unwrap_or_else(|error| panic!("generation in the partition failed: {error}"));
    assert_eq!(
        streamed, completion.text,
        "the streamed text is the completion's text"
    );
    assert_eq!(completion.token_ms.len(), completion.tokens.len());
    assert!(
        completion.token_ms.windows(2).all(|w| w[0] <= w[1]),
        "guest timestamps go forward"
    );
    completion
}

/// Checks `tokens` against llama.cpp's when the host engine agrees with
/// llama.cpp: a disagreement of the engine itself is reference_models.rs's
/// to report; what this file checks is that the partition runs the engine
/// exactly as the host does.
fn compare_with_llama_cpp(what: &str, host: &[u32], partition: &[u32], llama_cpp: &[u32]) {
    let n = partition.len().min(llama_cpp.len());
    if host[..n] == llama_cpp[..n] {
        assert_eq!(
            partition[..n],
            llama_cpp[..n],
            "{what}: the partition differs from llama.cpp"
        );
    } else {
        let at = host
            .iter()
            .zip(llama_cpp)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "NOTE {what}: the host engine itself differs from llama.cpp at step {at} \
             (see tests/reference_models.rs); the partition equals the host engine"
        );
    }
}

/// Exits per generated token over several completions, checked and printed.
///
/// What the guest decides is exact: one notification per generated token.
/// MMIO exits during a request depend on scheduling: a worker the host woke
/// with the request but that the host did not run within the guest's wait
/// (a busy 2-core machine) is woken by the pool with one WAKE write, and the
/// boot vCPU may reach its idle PARK just as the host submits. So each request
/// may add at most one MMIO exit per vCPU, and no more.
fn check_exits(what: &str, vcpus: u64, completions: &[&Completion]) {
    let exits: u64 = completions.iter().map(|c| c.exits).sum();
    let tokens: usize = completions.iter().map(|c| c.tokens.len()).sum();
    let notifications: u64 = completions.iter().map(|c| c.notifications).sum();
    let mmio = exits - notifications;
    let per_token = exits as f64 / tokens.max(1) as f64;
    eprintln!(
        "{what}: {exits} exits ({notifications} notifications, {mmio} MMIO) for {tokens} tokens: {per_token:.3} per token"
    );
    assert!(
        notifications <= tokens as u64,
        "{what}: {notifications} notifications for {tokens} generated tokens; the guest notifies once per token"
    );
    let wake_budget = completions.len() as u64 * vcpus;
    assert!(
        mmio <= wake_budget,
        "{what}: {mmio} MMIO exits during {} requests on {vcpus} vCPU(s); at most one (a wake or a park) per vCPU and request is expected",
        completions.len()
    );
}

/// Ends the partition cleanly and checks that the host counted exactly the
/// notifications the guest reported (its completions', and the ready event's).
fn exit_cleanly(partition: InferencePartition, completions: &[&Completion]) {
    let outcome = partition
        .exit(Duration::from_secs(10))
        .expect("the partition was still running");
    match &outcome.result {
        Ok(0) => {}
        other => panic!(
            "expected a clean exit, got {other:?}\nconsole:\n{}",
            outcome.console
        ),
    }
    assert!(
        outcome.console.contains("model "),
        "console:\n{}",
        outcome.console
    );
    let reported: u64 = completions.iter().map(|c| c.notifications).sum();
    assert_eq!(
        outcome.inference_notifications,
        reported + 1,
        "host-counted vs guest-reported notifications"
    );
}

/// The host engine's greedy completions of `prompts`, one after the other in
/// one session (as the partition runs them), each the whole context.
fn host_greedy(model_path: &Path, prompts: &[&[u32]], max_tokens: usize) -> Vec<Vec<u32>> {
    common::with_greedy_host_engine(model_path, N_CTX, max_tokens, false, |engine| {
        prompts
            .iter()
            .map(|prompt| engine.complete(prompt, &mut |_| {}).unwrap().tokens)
            .collect()
    })
}

#[test]
fn gemma_in_partitions_of_one_and_two_vcpus_equals_the_host_engine_and_llama_cpp() {
    if !common::kvm_available(
        "gemma_in_partitions_of_one_and_two_vcpus_equals_the_host_engine_and_llama_cpp",
    ) {
        return;
    }
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let model = common::default_model();
    let fixture =
        load_fixture(&common::fixtures().join("reference/greedy_gemma3-270m-q4_k_m.json"));
    // A plain prompt and one in the chat format with special tokens.
    let cases: Vec<&GreedyCase> = [0, 6].iter().map(|&i| &fixture.cases[i]).collect();
    let prompt_ids: Vec<&[u32]> = cases.iter().map(|c| c.prompt_ids.as_slice()).collect();
    let host = host_greedy(&model, &prompt_ids, GEMMA_TOKENS);

    // One vCPU; text prompts, tokenized by the guest.
    let mut partition = boot(&model, 1);
    let mut completions = Vec::new();
    for (case, host_tokens) in cases.iter().zip(&host) {
        let completion = run(
            &mut partition,
            &greedy(Prompt::Text(&case.prompt), GEMMA_TOKENS),
        );
        assert_eq!(
            completion.n_context,
            case.prompt_ids.len(),
            "guest tokenization of {:?}",
            case.prompt
        );
        assert_eq!(
            &completion.tokens, host_tokens,
            "1 vCPU, prompt {:?}",
            case.prompt
        );
        assert_eq!(completion.stop, StopReason::MaxTokens);
        compare_with_llama_cpp(&case.prompt, host_tokens, &completion.tokens, &case.tokens);
        eprintln!(
            "1 vCPU: {:?} -> {:?} ({:.1} tok/s, first token {:.1} ms)",
            case.prompt,
            completion.text,
            completion.gen_tok_s(),
            completion.ttft_ms
        );
        completions.push(completion);
    }
    check_exits("Gemma, 1 vCPU", 1, &completions.iter().collect::<Vec<_>>());
    exit_cleanly(partition, &completions.iter().collect::<Vec<_>>());

    // Two vCPUs; token-id prompts. Same tokens as one vCPU (and the host).
    let mut partition = boot(&model, 2);
    let mut two = Vec::new();
    for (case, one_vcpu) in cases.iter().zip(&completions) {
        let completion = run(
            &mut partition,
            &greedy(Prompt::Tokens(&case.prompt_ids), GEMMA_TOKENS),
        );
        assert_eq!(
            completion.tokens, one_vcpu.tokens,
            "2 vCPUs differ from 1 on {:?}",
            case.prompt
        );
        assert_eq!(completion.text, one_vcpu.text);
        two.push(completion);
    }
    check_exits("Gemma, 2 vCPUs", 2, &two.iter().collect::<Vec<_>>());
    exit_cleanly(partition, &two.iter().collect::<Vec<_>>());
}

#[test]
fn a_chat_through_the_device_reuses_the_cached_conversation() {
    if !common::kvm_available("a_chat_through_the_device_reuses_the_cached_conversation") {
        return;
    }
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let model_path = common::default_model();
    let mapped = MappedModel::open(&model_path).unwrap();
    let gguf = mapped.parse().unwrap();
    let model = mapped.load(&gguf).unwrap();
    let template = ChatTemplate::for_model(&gguf, model.config.arch);
    let mut partition = boot(&model_path, 2);

    let mut history: Vec<(Role, String)> = vec![(Role::User, "Name a color of the sky.".into())];
    let render = |history: &[(Role, String)]| {
        let messages: Vec<Message<'_>> = history
            .iter()
            .map(|(role, content)| Message {
                role: *role,
                content,
            })
            .collect();
        template.render(&messages, true)
    };
    let first_text = render(&history);
    let first = run(&mut partition, &greedy(Prompt::Text(&first_text), 16));
    assert_eq!(first.n_reused, 0);
    assert_eq!(first.n_fed, first.n_context);
    history.push((Role::Assistant, first.text.clone()));
    history.push((Role::User, "And of grass?".into()));
    let second_text = render(&history);
    let second = run(&mut partition, &greedy(Prompt::Text(&second_text), 16));
    eprintln!(
        "chat: turn 1 fed {} of {} tokens; turn 2 fed {} of {} (reused {}); replies {:?} / {:?}",
        first.n_fed,
        first.n_context,
        second.n_fed,
        second.n_context,
        second.n_reused,
        first.text,
        second.text
    );
    assert!(
        second.n_fed < second.n_context,
        "the second turn fed the whole conversation again ({} of {})",
        second.n_fed,
        second.n_context
    );
    assert!(
        second.n_reused >= first.n_context,
        "reused {} < first context {}",
        second.n_reused,
        first.n_context
    );
    assert_eq!(second.n_reused + second.n_fed, second.n_context);

    // The host engine, given the same two requests, replies the same.
    let first_tokens = model.tokenizer.encode(&first_text, true, true);
    let second_tokens = model.tokenizer.encode(&second_text, true, true);
    assert_eq!(
        second_tokens.len(),
        second.n_context,
        "guest and host tokenize the conversation alike"
    );
    let host = host_greedy(&model_path, &[&first_tokens, &second_tokens], 16);
    assert_eq!(first.tokens, host[0]);
    assert_eq!(second.tokens, host[1]);
    check_exits("chat, 2 vCPUs", 2, &[&first, &second]);
    exit_cleanly(partition, &[&first, &second]);
}

/// The committed tiny models that have a greedy llama.cpp fixture.
fn tiny_fixtures() -> Vec<(PathBuf, GreedyFixture)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(common::fixtures().join("reference")) else {
        return found;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("greedy_") || name.contains("gemma3") {
            continue;
        }
        let fixture = load_fixture(&path);
        let model = common::fixtures().join("models").join(&fixture.model_file);
        if model.is_file() {
            found.push((model, fixture));
        } else {
            eprintln!(
                "{}: no committed model {}; not run",
                fixture.model,
                model.display()
            );
        }
    }
    found
}

#[test]
fn tiny_models_in_a_partition_equal_the_host_engine_and_llama_cpp() {
    if !common::kvm_available("tiny_models_in_a_partition_equal_the_host_engine_and_llama_cpp") {
        return;
    }
    let fixtures = tiny_fixtures();
    if fixtures.is_empty() {
        if common::in_ci() {
            panic!("no tiny model fixtures in tests/fixtures/models");
        }
        eprintln!("tiny_models_in_a_partition_equal_the_host_engine_and_llama_cpp: SKIPPED: no tiny model fixtures");
        return;
    }
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    for (path, fixture) in &fixtures {
        let max_tokens = fixture
            .cases
            .iter()
            .map(|c| c.tokens.len())
            .max()
            .unwrap_or(0);
        let prompts: Vec<&[u32]> = fixture
            .cases
            .iter()
            .map(|c| c.prompt_ids.as_slice())
            .collect();
        let host = host_greedy(path, &prompts, max_tokens);
        let mut partition = boot(path, 2);
        let mut completions = Vec::new();
        for (case, host_tokens) in fixture.cases.iter().zip(&host) {
            let completion = run(
                &mut partition,
                &greedy(Prompt::Text(&case.prompt), max_tokens),
            );
            let what = format!("{}: {:?}", fixture.model, case.prompt);
            assert_eq!(
                completion.n_context,
                case.prompt_ids.len(),
                "{what}: guest tokenization"
            );
            assert_eq!(
                &completion.tokens, host_tokens,
                "{what}: the partition differs from the host engine"
            );
            compare_with_llama_cpp(&what, host_tokens, &completion.tokens, &case.tokens);
            completions.push(completion);
        }
        let tokens: usize = completions.iter().map(|c| c.tokens.len()).sum();
        eprintln!(
            "{}: {} prompts, {tokens} greedy tokens in the partition equal to the host engine",
            fixture.model,
            fixture.cases.len()
        );
        check_exits(&fixture.model, 2, &completions.iter().collect::<Vec<_>>());
        exit_cleanly(partition, &completions.iter().collect::<Vec<_>>());
    }
}

#[test]
fn a_cancelled_request_stops_early_and_the_next_one_is_unaffected() {
    let name = "a_cancelled_request_stops_early_and_the_next_one_is_unaffected";
    if !common::kvm_available(name) {
        return;
    }
    let Some((path, fixture)) = tiny_fixtures().into_iter().next() else {
        assert!(
            !common::in_ci(),
            "no tiny model fixtures in tests/fixtures/models"
        );
        eprintln!("{name}: SKIPPED: no tiny model fixtures");
        return;
    };
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let case = &fixture.cases[0];
    let mut partition = boot(&path, 1);
    // Without stopping at end-of-generation, so only the cancel ends it early.
    let long = GenerationRequest {
        stop_at_eog: false,
        ..greedy(Prompt::Text(&case.prompt), 200)
    };
    let mut pieces = 0;
    let cancelled = partition
        .generate(&long, &mut |_| {
            pieces += 1;
            if pieces >= 3 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .unwrap_or_else(|error| panic!("the cancelled request failed: {error}"));
    assert_eq!(cancelled.stop, StopReason::Cancelled);
    assert!(
        cancelled.tokens.len() >= 3 && cancelled.tokens.len() < 200,
        "the guest stopped soon after the cancel: {} tokens",
        cancelled.tokens.len()
    );
    // The cancelled tokens are the start of the same greedy run.
    let full = run(
        &mut partition,
        &greedy(Prompt::Text(&case.prompt), case.tokens.len()),
    );
    assert_eq!(&full.tokens[..3], &cancelled.tokens[..3]);
    let host = host_greedy(&path, &[case.prompt_ids.as_slice()], case.tokens.len());
    assert_eq!(
        full.tokens, host[0],
        "the request after a cancel equals the host engine"
    );
    exit_cleanly(partition, &[&cancelled, &full]);
}

/// A GGUF file with the given metadata strings and no tensors.
fn gguf_with_strings(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend((pairs.len() as u64).to_le_bytes());
    for (key, value) in pairs {
        bytes.extend((key.len() as u64).to_le_bytes());
        bytes.extend(key.as_bytes());
        bytes.extend(8u32.to_le_bytes()); // string
        bytes.extend((value.len() as u64).to_le_bytes());
        bytes.extend(value.as_bytes());
    }
    bytes
}

fn temporary_model(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "aivmm-inference-{name}-{}.gguf",
        std::process::id()
    ));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Boots a partition with an explicit size (the host does not look at the model).
fn boot_unchecked(
    model: &Path,
    vcpus: u32,
    requests: GuestRequests,
) -> Result<InferencePartition, InferenceError> {
    InferencePartition::start(
        PartitionConfig {
            vcpus,
            memory_bytes: 64 << 20,
            model: Some(model.to_path_buf()),
            guest_requests: requests,
            inference: Some(InferenceSetup {
                n_ctx: 256,
                max_batch: 32,
                warmup_heap_bytes: 8 << 20,
            }),
            ..PartitionConfig::default()
        },
        READY_TIMEOUT,
    )
}

#[test]
fn a_model_the_engine_cannot_run_is_reported_by_the_guest() {
    if !common::kvm_available("a_model_the_engine_cannot_run_is_reported_by_the_guest") {
        return;
    }
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let unsupported = temporary_model(
        "mamba",
        &gguf_with_strings(&[("general.architecture", "mamba")]),
    );
    let mut garbage = b"GGUF\x03\0\0\0".to_vec();
    garbage.extend([0xff; 64]);
    let corrupt = temporary_model("corrupt", &garbage);
    for (path, expected) in [(&unsupported, "mamba"), (&corrupt, "GGUF")] {
        let result = boot_unchecked(path, 1, GuestRequests::default());
        std::fs::remove_file(path).unwrap();
        match result {
            Err(error @ InferenceError::ModelCannotRun(_)) => {
                let message = error.to_string();
                eprintln!("reported: {message}");
                assert!(
                    message.starts_with("the model in the partition cannot run: "),
                    "{message}"
                );
                assert!(message.contains(expected), "{message}");
            }
            Err(other) => panic!("expected the guest's model error, got: {other}"),
            Ok(_) => panic!("a partition got ready with {}", path.display()),
        }
    }
}

#[test]
fn a_guest_fault_while_serving_names_the_vcpu_and_rip() {
    if !common::kvm_available("a_guest_fault_while_serving_names_the_vcpu_and_rip") {
        return;
    }
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let Some((model, _)) = tiny_fixtures().into_iter().next() else {
        eprintln!(
            "a_guest_fault_while_serving_names_the_vcpu_and_rip: SKIPPED: no tiny model fixture"
        );
        return;
    };
    let requests = GuestRequests {
        debug_flags: debug::FAULT_NOW,
        debug_vcpu: 1,
        ..GuestRequests::default()
    };
    match boot_unchecked(&model, 2, requests) {
        Err(InferenceError::Partition(PartitionError::GuestFault(fault))) => {
            let message = PartitionError::GuestFault(fault.clone()).to_string();
            eprintln!("reported: {message}");
            assert_eq!(fault.vcpu, 1);
            assert!(
                message.contains("vCPU 1") && message.contains("RIP 0x"),
                "{message}"
            );
        }
        Err(other) => panic!("expected a guest fault, got: {other}"),
        Ok(_) => panic!("the partition got ready despite the fault request"),
    }
}

/// The sizing `aivmm run` does, on the real model: the default fits, and a
/// too-small --memory is refused with the minimum, before anything boots.
#[test]
fn too_little_memory_is_refused_before_boot() {
    let model_path = common::default_model();
    let mapped = MappedModel::open(&model_path).unwrap();
    let gguf = Gguf::parse(mapped.bytes()).unwrap();
    let model = Model::load(&gguf).unwrap();
    let path = model_path.to_string_lossy().into_owned();
    let args = |extra: &[&str]| {
        let mut argv = vec!["run", "--model", &path, "--prompt", "hi", "--vcpus", "1"];
        argv.extend_from_slice(extra);
        RunArgs::try_parse_from(argv).unwrap()
    };
    let prepared = prepare(&args(&[]), &model).unwrap();
    assert!(prepared.memory_bytes >= prepared.plan.minimum_bytes);
    assert!(
        prepared.plan.session_bytes >= 72 << 20,
        "4096 tokens of Gemma's f16 KV cache are 72 MiB"
    );

    let error = match prepare(&args(&["--memory", "64M"]), &model) {
        Err(error) => error,
        Ok(prepared) => panic!(
            "64M accepted for a model needing {} bytes",
            prepared.plan.minimum_bytes
        ),
    };
    let message = error.to_string();
    eprintln!("reported: {message}");
    assert!(
        matches!(
            error,
            RunError::Inference(InferenceError::MemoryTooSmall { .. })
        ),
        "{message}"
    );
    let minimum_mib = prepared.plan.minimum_bytes >> 20;
    assert!(
        message.contains(&format!("at least {minimum_mib} MiB")),
        "{message}"
    );
    assert!(message.contains("--memory"), "{message}");

    // A smaller context needs less: the same 64M may then be enough.
    let small = prepare(&args(&["--ctx-size", "256"]), &model).unwrap();
    assert!(small.plan.minimum_bytes < prepared.plan.minimum_bytes);
    assert!(matches!(
        prepare(&args(&["--memory", "lots"]), &model),
        Err(RunError::MemorySize { .. })
    ));
}
