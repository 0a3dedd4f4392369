//! Token ids and detokenized text equal llama.cpp's on tricky strings (leading
//! and repeated spaces, newlines, digits, emoji, CJK, special-token strings),
//! for every vocabulary with a fixture in tests/fixtures/reference/.

mod common;

use aivmm_engine::gguf::Gguf;
use aivmm_engine::tokenizer::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct TokenizerFixture {
    model: String,
    model_file: String,
    vocab: VocabFacts,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct VocabFacts {
    n_tokens: usize,
    eog_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    add_special: bool,
    parse_special: bool,
    ids: Vec<u32>,
}

fn check(fixture_name: &str) {
    let path = common::fixtures()
        .join("reference")
        .join(format!("tokenizer_{fixture_name}.json"));
    let f: TokenizerFixture =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let model_path = if f.model.starts_with("gemma3") {
        common::default_model()
    } else {
        common::fixtures().join("models").join(&f.model_file)
    };
    let bytes = std::fs::read(&model_path).unwrap();
    let gguf = Gguf::parse(&bytes).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(tok.n_vocab(), f.vocab.n_tokens);
    assert_eq!(
        tok.end_of_generation_tokens(),
        &f.vocab.eog_ids[..],
        "end-of-generation tokens"
    );
    let mut mismatches = Vec::new();
    for c in &f.cases {
        let ids = tok.encode(&c.text, c.add_special, c.parse_special);
        if ids != c.ids {
            mismatches.push(format!(
                "{:?} (add_special {}, parse_special {}): ours {:?}, llama.cpp {:?}",
                c.text, c.add_special, c.parse_special, ids, c.ids
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{fixture_name}: {} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    println!("{fixture_name}: {} cases equal to llama.cpp", f.cases.len());
}

#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    check("gemma3");
}

#[test]
fn tiny_llama_tokenizer_matches_llama_cpp() {
    check("tiny-llama");
}

#[test]
fn tiny_qwen2_gpt2_tokenizer_matches_llama_cpp() {
    check("tiny-qwen2");
}
