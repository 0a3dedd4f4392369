//! Our engine against llama.cpp, token for token: the committed fixtures in
//! tests/fixtures/reference/ were produced by tests/reference/make_fixtures.py
//! with llama.cpp on the same models (the real Gemma 3 270M, fetched by
//! images/fetch-model.sh; the tiny generated models in tests/fixtures/models/).
//!
//! For every fixture prompt: the prompt's token ids must equal llama.cpp's,
//! the logits after the prompt must have the same top-1 and differ by no more
//! than llama.cpp's own spread, and the greedy continuation must equal
//! llama.cpp's up to a step where llama.cpp's top-1/top-2 margin is so small
//! that llama.cpp itself flips it between its own configurations.
//!
//! "llama.cpp's own spread" is measured, not assumed (tests/reference/
//! llama_cpp_spread.py): toggling only flash attention moves llama.cpp's
//! logits by up to 1.40 on Gemma 3 270M (and keeps only 3 of its 8 prompts,
//! 253 of 512 tokens, on the same greedy path), 0.045 on the tiny F16 models,
//! 1.0-1.3 on the tiny Q8_0/Q4_K_M models (random weights make them
//! chaotic: one int8 rounding flip in an activation moves the logits by ~1;
//! 0 of 6 tiny Q4_K_M prompts keep their path), and 6.4 / 4.4 on the
//! 22-layer TinyLlama-shaped Q4_K_M / Q8_0 models (0 of 5 prompts, 15 / 27 of
//! 160 tokens kept).
//!
//! llama.cpp's own output also depends on the CPU it runs on (its AVX2 and
//! AVX-512 builds sum in different orders: on Gemma 3 270M, 4 of the 8
//! prompts keep their path between the two). The engine reproduces the
//! arithmetic of llama.cpp's AVX2 build (f16 KV cache and flash attention,
//! the f16 GELU table, the K-quant matmul paths), and the Gemma and
//! TinyLlama-shaped fixtures were made by that build (on the TinyLlama-shaped
//! model the AVX-512 build's logits are up to 4.5 away from it), so the comparison runs our AVX2 kernels on any CPU
//! that has them: most Gemma prompts then agree bit for bit. What is left are
//! llama.cpp's sinf/cosf (glibc), which differ from libm's in the last bit
//! for about 1% of RoPE angles, and, for prompts of 64 tokens or more in one
//! llama.cpp batch (not in these fixtures), its tiled flash attention (f32
//! accumulation, SIMD exp), which the engine does not reproduce.

mod common;

use std::path::PathBuf;

use aivmm_engine::generate::{generate, Flow, Request};
use aivmm_engine::gguf::Gguf;
use aivmm_engine::host_pool::ThreadPool;
use aivmm_engine::model::{Model, Session, SessionLimits};
use aivmm_engine::parallel::{Parallel, Serial};
use aivmm_engine::quant::{Kernels, SimdLevel};
use aivmm_engine::sampling::SamplerConfig;
use serde::Deserialize;

#[derive(Deserialize)]
struct GreedyFixture {
    model: String,
    model_file: String,
    model_sha256: String,
    cases: Vec<GreedyCase>,
}

#[derive(Deserialize)]
struct GreedyCase {
    prompt: String,
    prompt_ids: Vec<u32>,
    tokens: Vec<u32>,
    margins: Vec<f32>,
    #[serde(default)]
    logits: Option<Vec<f32>>,
    #[serde(default)]
    top_logits: Option<Vec<(u32, f32)>>,
}

/// What one model's comparison found.
struct Comparison {
    max_logit_diff: f32,
    /// Greedy tokens equal to llama.cpp's, over all prompts.
    tokens_equal: usize,
    tokens_total: usize,
    /// Prompts whose whole continuation equals llama.cpp's.
    prompts_fully_equal: usize,
    /// Prompts whose top-1 token after the prompt equals llama.cpp's.
    top1_equal: usize,
    prompts: usize,
}

fn load_fixture(name: &str) -> GreedyFixture {
    let path = common::fixtures()
        .join("reference")
        .join(format!("greedy_{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn model_path(fixture: &GreedyFixture) -> PathBuf {
    if fixture.model.starts_with("gemma3") {
        common::default_model()
    } else if fixture.model.starts_with("tinyllama-shaped") {
        generated_model(&fixture.model).unwrap_or_else(|why| panic!("{why}"))
    } else {
        common::fixtures().join("models").join(&fixture.model_file)
    }
}

/// The path of a generated model that is too big to commit (made by
/// tests/reference/gen_models.py, which needs llama.cpp to quantize), or why
/// it is not there.
fn generated_model(name: &str) -> Result<PathBuf, String> {
    let out = std::process::Command::new(common::repo_root().join("images/fetch-model.sh"))
        .arg(name)
        .output()
        .map_err(|e| format!("cannot run images/fetch-model.sh: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs every case of the fixture through our engine and checks it.
/// `spread` is llama.cpp's own logit spread on this model (see the top).
fn compare(name: &str, par: &dyn Parallel, spread: f32) -> Comparison {
    let fixture = load_fixture(name);
    let path = model_path(&fixture);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        sha256_hex(&bytes),
        fixture.model_sha256,
        "{} is not the model the fixture was made from: regenerate with tests/reference/",
        path.display()
    );
    let gguf = Gguf::parse(&bytes).unwrap();
    let model = Model::load(&gguf).unwrap();
    let limits = SessionLimits {
        n_ctx: 1024,
        max_batch: 32,
        max_workers: par.n_workers(),
    };
    // The fixtures are llama.cpp's AVX2 arithmetic, which our AVX2 kernels follow.
    let kernels = Kernels::with_level(SimdLevel::Avx2).unwrap_or_else(Kernels::detect);
    let mut session = Session::new(&model, limits, kernels);
    let mut result = Comparison {
        max_logit_diff: 0.0,
        tokens_equal: 0,
        tokens_total: 0,
        prompts_fully_equal: 0,
        top1_equal: 0,
        prompts: fixture.cases.len(),
    };

    for case in &fixture.cases {
        let ids = model.tokenizer.encode(&case.prompt, true, true);
        assert_eq!(
            ids, case.prompt_ids,
            "{name}: tokens of prompt {:?}",
            case.prompt
        );

        session.truncate(0);
        let logits = session
            .forward(&model, &case.prompt_ids, par)
            .unwrap()
            .to_vec();
        let expected: Vec<(u32, f32)> = match (&case.logits, &case.top_logits) {
            (Some(full), _) => full
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect(),
            (None, Some(top)) => top.clone(),
            (None, None) => panic!("{name}: case without logits"),
        };
        let ours_top1 = logits
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &l)| if l > b.1 { (i, l) } else { b })
            .0;
        let theirs_top1 = expected
            .iter()
            .fold(
                (0, f32::MIN),
                |b, &(i, l)| if l > b.1 { (i as usize, l) } else { b },
            )
            .0;
        // The top-1 is the first greedy token: it may differ only at a near-tie (checked below).
        result.top1_equal += usize::from(ours_top1 == theirs_top1);
        let mut case_diff = 0f32;
        for &(id, l) in &expected {
            let d = (logits[id as usize] - l).abs();
            case_diff = case_diff.max(d);
        }
        if std::env::var_os("AIVMM_DEBUG_LOGITS").is_some() {
            eprintln!(
                "{name}: prompt {:?}: max |logit diff| {case_diff}",
                case.prompt
            );
        }
        result.max_logit_diff = result.max_logit_diff.max(case_diff);

        session.truncate(0);
        let req = Request {
            prompt: &case.prompt_ids,
            max_tokens: case.tokens.len(),
            sampling: SamplerConfig::greedy(),
            stop_at_eog: true,
        };
        let out = generate(&model, &mut session, par, &req, &mut |_| Flow::Continue).unwrap();
        let equal = out
            .tokens
            .iter()
            .zip(&case.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        result.tokens_total += case.tokens.len();
        result.tokens_equal += equal;
        if out.tokens == case.tokens {
            result.prompts_fully_equal += 1;
        } else {
            // Both engines' logits are within `spread` of each other, so a flip
            // is only possible where llama.cpp's margin is below twice that.
            let margin = case.margins.get(equal).copied().unwrap_or(f32::INFINITY);
            assert!(
                margin <= 2.0 * spread,
                "{name}: greedy continuation of {:?} diverges at step {equal}, where llama.cpp's top-1/top-2 margin is {margin} (not a near-tie)\n ours:      {:?}\n llama.cpp: {:?}",
                case.prompt,
                out.tokens,
                case.tokens
            );
            println!(
                "{name}: {:?}: equal for {equal} of {} tokens, then a near-tie (llama.cpp margin {margin})",
                case.prompt,
                case.tokens.len()
            );
        }
    }
    println!(
        "{name}: {} of {} prompts fully equal to llama.cpp; {} of {} greedy tokens equal; top-1 after the prompt equal for {} of {}; max |logit diff| after prompt {:.4}",
        result.prompts_fully_equal,
        fixture.cases.len(),
        result.tokens_equal,
        result.tokens_total,
        result.top1_equal,
        result.prompts,
        result.max_logit_diff
    );
    assert!(
        result.max_logit_diff <= spread,
        "{name}: max |logit difference| {} exceeds llama.cpp's own spread {spread}",
        result.max_logit_diff
    );
    result
}

#[test]
fn gemma3_270m_matches_llama_cpp() {
    // The acceptance of the engine: for at least 5 prompts the first 64
    // greedy tokens equal llama.cpp's, and the top-1 token after every prompt
    // is llama.cpp's (with the max |logit difference| reported above). Every
    // other divergence must still be a near-tie (checked in `compare`).
    let r = compare("gemma3-270m-q4_k_m", &Serial, 1.4);
    assert!(
        r.prompts_fully_equal >= 5,
        "only {} of {} prompts keep llama.cpp's 64 greedy tokens",
        r.prompts_fully_equal,
        r.prompts
    );
    assert_eq!(
        r.top1_equal, r.prompts,
        "top-1 after the prompt differs from llama.cpp's"
    );
}

#[test]
fn tiny_llama_f16_matches_llama_cpp() {
    let r = compare("tiny-llama-f16", &Serial, 0.05);
    assert_eq!(r.tokens_equal, r.tokens_total);
    assert_eq!(r.top1_equal, r.prompts);
}

#[test]
fn tiny_llama_q8_0_matches_llama_cpp() {
    compare("tiny-llama-q8_0", &Serial, 1.3);
}

#[test]
fn tiny_llama_q4_k_m_matches_llama_cpp() {
    compare("tiny-llama-q4_k_m", &Serial, 1.3);
}

/// The TinyLlama-1.1B-shaped model (22 layers, n_embd 2048, vocab 32000) in
/// `name`'s format, within `spread`. It is generated, not downloaded, and
/// making it needs llama.cpp (`bench/engine-vs-llamacpp.sh` or
/// `tests/reference/gen_models.py --tinyllama` make it), which CI does not
/// build: without it, the test says so and checks nothing. As for the tiny
/// quantized models, the top-1 after a prompt may differ only where
/// llama.cpp's own margin is a near-tie (`compare` checks that for the first
/// greedy token too): one Q8_0 prompt has a margin of 0.21 there.
fn tinyllama_shaped_matches_llama_cpp(name: &str, spread: f32) {
    if let Err(why) = generated_model(name) {
        println!("skipped: the TinyLlama-shaped model is not in the cache: {why}");
        return;
    }
    compare(name, &Serial, spread);
}

#[test]
fn tinyllama_shaped_q4_k_m_matches_llama_cpp() {
    tinyllama_shaped_matches_llama_cpp("tinyllama-shaped-q4_k_m", 6.4);
}

#[test]
fn tinyllama_shaped_q8_0_matches_llama_cpp() {
    tinyllama_shaped_matches_llama_cpp("tinyllama-shaped-q8_0", 4.4);
}

#[test]
fn tiny_qwen2_matches_llama_cpp() {
    let r = compare("tiny-qwen2-f16", &Serial, 0.05);
    assert_eq!(r.tokens_equal, r.tokens_total);
    assert_eq!(r.top1_equal, r.prompts);
}

/// Splitting the work across threads changes nothing: every output row and
/// attention head is computed by exactly one worker, in the same order.
#[test]
fn two_threads_compute_exactly_what_one_does() {
    let bytes = std::fs::read(common::default_model()).unwrap();
    let gguf = Gguf::parse(&bytes).unwrap();
    let model = Model::load(&gguf).unwrap();
    let prompt = model.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog because",
        true,
        true,
    );
    let run = |par: &dyn Parallel| {
        let limits = SessionLimits {
            n_ctx: 256,
            max_batch: 8,
            max_workers: par.n_workers(),
        };
        let mut session = Session::new(&model, limits, Kernels::detect());
        let logits = session.forward(&model, &prompt, par).unwrap().to_vec();
        let req = Request {
            prompt: &prompt,
            max_tokens: 24,
            sampling: SamplerConfig::greedy(),
            stop_at_eog: false,
        };
        let out = generate(&model, &mut session, par, &req, &mut |_| Flow::Continue).unwrap();
        (logits, out.tokens)
    };
    let serial = run(&Serial);
    let pool = ThreadPool::new(2).unwrap();
    assert!(
        serial == run(&pool),
        "2 threads changed the logits or tokens"
    );
}
