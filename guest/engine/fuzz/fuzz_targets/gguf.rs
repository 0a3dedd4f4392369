//! Arbitrary bytes through the GGUF reader and, when they parse, through model
//! and tokenizer loading: any outcome but an error value is a bug.
#![no_main]

use aivmm_engine::gguf::Gguf;
use aivmm_engine::model::Model;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::parse(data) {
        for t in g.tensors() {
            assert!(t.data.len() as u64 <= data.len() as u64);
        }
        if let Ok(model) = Model::load(&g) {
            let ids = model.tokenizer.encode("Hello world <s> 123 ✓", true, true);
            assert!(ids.iter().all(|&id| (id as usize) < model.config.n_vocab));
        }
    }
});
