//! Our engine against llama.cpp, token for token: the committed fixtures in
//! tests/fixtures/reference/ were produced by tests/reference/make_fixtures.py
//! with llama.cpp on the same models (the real Gemma 3 270M, fetched by
//! images/fetch-model.sh; the tiny generated models in tests/fixtures/models/).
//!
//! For every fixture prompt: the prompt's token ids, the logits after the
//! prompt (same top-1, max |difference| within tolerance) and the greedy
//! continuation must equal llama.cpp's.

mod common;

use std::path::PathBuf;

use aivmm_engine::generate::{generate, Flow, Request};
use aivmm_engine::gguf::Gguf;
use aivmm_engine::host_pool::ThreadPool;
use aivmm_engine::model::{Model, Session, SessionLimits};
use aivmm_engine::parallel::{Parallel, Serial};
use aivmm_engine::quant::Kernels;
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
    tokens_compared: usize,
}

fn load_fixture(name: &str) -> GreedyFixture {
    let path = common::fixtures().join("reference").join(format!("greedy_{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn model_path(fixture: &GreedyFixture) -> PathBuf {
    if fixture.model.starts_with("gemma3") {
        common::default_model()
    } else {
        common::fixtures().join("models").join(&fixture.model_file)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs every case of the fixture through our engine and checks it.
fn compare(name: &str, par: &dyn Parallel, logit_tolerance: f32) -> Comparison {
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
    let limits = SessionLimits { n_ctx: 1024, max_batch: 32, max_workers: par.n_workers() };
    let mut session = Session::new(&model, limits, Kernels::detect());
    let mut result = Comparison { max_logit_diff: 0.0, tokens_compared: 0 };

    for case in &fixture.cases {
        let ids = model.tokenizer.encode(&case.prompt, true, true);
        assert_eq!(ids, case.prompt_ids, "{name}: tokens of prompt {:?}", case.prompt);

        session.truncate(0);
        let logits = session.forward(&model, &case.prompt_ids, par).unwrap().to_vec();
        let expected: Vec<(u32, f32)> = match (&case.logits, &case.top_logits) {
            (Some(full), _) => full.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect(),
            (None, Some(top)) => top.clone(),
            (None, None) => panic!("{name}: case without logits"),
        };
        let ours_top1 = logits.iter().enumerate().fold((0, f32::MIN), |b, (i, &l)| if l > b.1 { (i, l) } else { b }).0;
        let theirs_top1 =
            expected.iter().fold((0, f32::MIN), |b, &(i, l)| if l > b.1 { (i as usize, l) } else { b }).0;
        assert_eq!(ours_top1, theirs_top1, "{name}: top-1 after prompt {:?}", case.prompt);
        for &(id, l) in &expected {
            let d = (logits[id as usize] - l).abs();
            result.max_logit_diff = result.max_logit_diff.max(d);
        }

        session.truncate(0);
        let req = Request {
            prompt: &case.prompt_ids,
            max_tokens: case.tokens.len(),
            sampling: SamplerConfig::greedy(),
            stop_at_eog: true,
        };
        let out = generate(&model, &mut session, par, &req, &mut |_| Flow::Continue).unwrap();
        if out.tokens != case.tokens {
            let at = out.tokens.iter().zip(&case.tokens).take_while(|(a, b)| a == b).count();
            panic!(
                "{name}: greedy continuation of {:?} diverges at step {at} (llama.cpp's top-1/top-2 margin there: {:?})\n ours:  {:?}\n llama.cpp: {:?}",
                case.prompt,
                case.margins.get(at),
                out.tokens,
                case.tokens
            );
        }
        result.tokens_compared += out.tokens.len();
    }
    println!(
        "{name}: {} prompts, {} greedy tokens equal to llama.cpp, max |logit diff| after prompt {:.4}",
        fixture.cases.len(),
        result.tokens_compared,
        result.max_logit_diff
    );
    assert!(
        result.max_logit_diff <= logit_tolerance,
        "{name}: max |logit difference| {} exceeds {logit_tolerance}",
        result.max_logit_diff
    );
    result
}

#[test]
fn gemma3_270m_matches_llama_cpp() {
    let r = compare("gemma3-270m-q4_k_m", &Serial, 0.5);
    assert!(r.tokens_compared >= 5 * 64 - 64, "too few tokens compared: {}", r.tokens_compared);
}

#[test]
fn tiny_llama_f16_matches_llama_cpp() {
    compare("tiny-llama-f16", &Serial, 0.05);
}

#[test]
fn tiny_llama_q8_0_matches_llama_cpp() {
    compare("tiny-llama-q8_0", &Serial, 0.1);
}

#[test]
fn tiny_llama_q4_k_m_matches_llama_cpp() {
    compare("tiny-llama-q4_k_m", &Serial, 0.1);
}

#[test]
fn tiny_qwen2_matches_llama_cpp() {
    compare("tiny-qwen2-f16", &Serial, 0.05);
}

#[test]
fn two_threads_give_the_same_result() {
    let pool = ThreadPool::new(2).unwrap();
    compare("tiny-llama-q4_k_m", &pool, 0.1);
}
