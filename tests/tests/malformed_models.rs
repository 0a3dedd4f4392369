//! Malformed model files get an error, never a panic or an out-of-bounds read:
//! truncations and corruptions of real model files through the GGUF reader,
//! the model loader and the tokenizer.

mod common;

use aivmm_engine::gguf::{Gguf, GgufError};
use aivmm_engine::model::Model;
use common::TestRng;

/// Parses and loads; a load that succeeds must give a usable tokenizer.
fn parse_and_load(bytes: &[u8]) -> Result<(), String> {
    let g = Gguf::parse(bytes).map_err(|e| e.to_string())?;
    let model = Model::load(&g).map_err(|e| e.to_string())?;
    let ids = model.tokenizer.encode("Hello, world! 123", true, true);
    assert!(ids.iter().all(|&id| (id as usize) < model.config.n_vocab));
    Ok(())
}

fn fixture_models() -> Vec<(String, Vec<u8>)> {
    let dir = common::fixtures().join("models");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "gguf") {
            out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    assert!(!out.is_empty(), "no fixture models in {}", dir.display());
    out
}

#[test]
fn every_fixture_model_loads() {
    for (name, bytes) in fixture_models() {
        parse_and_load(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn truncated_models_are_rejected_with_a_reason() {
    for (name, bytes) in fixture_models() {
        let mut rng = TestRng::new(1);
        let mut cuts: Vec<usize> = (0..200).map(|_| rng.below(bytes.len())).collect();
        cuts.extend([0, 3, 4, 8, 16, 24, bytes.len() - 1]);
        for cut in cuts {
            let err =
                parse_and_load(&bytes[..cut]).expect_err(&format!("{name} cut at {cut} loaded"));
            assert!(!err.is_empty());
        }
    }
}

#[test]
fn corrupted_headers_never_panic() {
    // Flip bytes in the header, metadata and tensor-info region (where every
    // count, length, type and offset lives); each result is either a clean
    // error or a model that still works.
    for (name, bytes) in fixture_models() {
        let header_len = Gguf::parse(&bytes).unwrap().data_offset as usize;
        let mut rng = TestRng::new(7);
        for round in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..1 + round % 4 {
                let at = rng.below(header_len);
                b[at] = match rng.below(4) {
                    0 => 0xff,
                    1 => 0,
                    2 => b[at] ^ (1 << rng.below(8)),
                    _ => rng.next() as u8,
                };
            }
            let _ = std::panic::catch_unwind(|| parse_and_load(&b))
                .unwrap_or_else(|_| panic!("{name}: panic after corrupting round {round}"));
        }
    }
}

#[test]
fn real_model_truncated_reports_the_tensor() {
    let bytes = std::fs::read(common::default_model()).unwrap();
    // Cut in the middle of the tensor data: the header parses, a tensor doesn't fit.
    let err = Gguf::parse(&bytes[..bytes.len() / 2]).unwrap_err();
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    // Cut inside the vocabulary metadata.
    let err = Gguf::parse(&bytes[..100_000]).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
}
