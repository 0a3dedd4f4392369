//! Reading a [`VocabSpec`] from the `tokenizer.ggml.*` keys of a GGUF file,
//! with llama.cpp's defaults (`llama_vocab::impl::load`).

use alloc::vec::Vec;

use super::{TokenType, TokenizerError, VocabSpec};
use crate::gguf::{Array, Gguf, Value};

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const TOKENS: &str = "tokenizer.ggml.tokens";
const SCORES: &str = "tokenizer.ggml.scores";
const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const MERGES: &str = "tokenizer.ggml.merges";
const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";

pub fn spec_from_gguf<'a>(gguf: &Gguf<'a>) -> Result<VocabSpec<'a>, TokenizerError> {
    let model = string(gguf, MODEL)?.ok_or(TokenizerError::MissingKey { key: MODEL })?;
    let pre = string(gguf, PRE)?;
    let tokens = strings(gguf, TOKENS)?.ok_or(TokenizerError::MissingKey { key: TOKENS })?;
    let mut spec = VocabSpec::with_defaults(model, pre, tokens)?;
    let n = spec.tokens.len();

    const SCORES_TYPE: &str = "an array of f32 or i32";
    if let Some(a) = array(gguf, SCORES, SCORES_TYPE)? {
        spec.scores = match (a.f32s(), a.i32s()) {
            (Some(f), _) => f.collect(),
            (None, Some(i)) => i.map(|v| v as f32).collect(),
            (None, None) => {
                return Err(TokenizerError::WrongType {
                    key: SCORES,
                    expected: SCORES_TYPE,
                })
            }
        };
    }
    const TYPES_TYPE: &str = "an array of i32";
    if let Some(a) = array(gguf, TOKEN_TYPE, TYPES_TYPE)? {
        let types = a.i32s().ok_or(TokenizerError::WrongType {
            key: TOKEN_TYPE,
            expected: TYPES_TYPE,
        })?;
        spec.token_types = types.map(TokenType::from_gguf).collect();
    }
    if spec.kind == super::TokenizerKind::BytePairEncoding {
        spec.merges = strings(gguf, MERGES)?.ok_or(TokenizerError::MissingKey { key: MERGES })?;
    }
    if let Some(v) = boolean(gguf, ADD_SPACE_PREFIX)? {
        spec.add_space_prefix = v;
    }

    let s = &mut spec.special;
    let ids: [(&'static str, &mut Option<u32>); 12] = [
        ("tokenizer.ggml.bos_token_id", &mut s.bos),
        ("tokenizer.ggml.eos_token_id", &mut s.eos),
        ("tokenizer.ggml.eot_token_id", &mut s.eot),
        ("tokenizer.ggml.eom_token_id", &mut s.eom),
        ("tokenizer.ggml.unknown_token_id", &mut s.unk),
        ("tokenizer.ggml.padding_token_id", &mut s.pad),
        ("tokenizer.ggml.fim_pre_token_id", &mut s.fim_pre),
        ("tokenizer.ggml.fim_suf_token_id", &mut s.fim_suf),
        ("tokenizer.ggml.fim_mid_token_id", &mut s.fim_mid),
        ("tokenizer.ggml.fim_pad_token_id", &mut s.fim_pad),
        ("tokenizer.ggml.fim_rep_token_id", &mut s.fim_rep),
        ("tokenizer.ggml.fim_sep_token_id", &mut s.fim_sep),
    ];
    for (key, slot) in ids {
        read_id(gguf, key, n, slot)?;
    }
    // Older files name the FIM tokens differently; llama.cpp reads these last.
    read_id(gguf, "tokenizer.ggml.prefix_token_id", n, &mut s.fim_pre)?;
    read_id(gguf, "tokenizer.ggml.suffix_token_id", n, &mut s.fim_suf)?;
    read_id(gguf, "tokenizer.ggml.middle_token_id", n, &mut s.fim_mid)?;
    if let Some(v) = boolean(gguf, ADD_BOS)? {
        spec.add_bos = v;
    }
    if let Some(v) = boolean(gguf, ADD_EOS)? {
        spec.add_eos = v;
    }
    Ok(spec)
}

fn string<'a>(gguf: &Gguf<'a>, key: &'static str) -> Result<Option<&'a str>, TokenizerError> {
    match gguf.get(key) {
        None => Ok(None),
        Some(Value::Str(s)) => Ok(Some(s)),
        Some(_) => Err(TokenizerError::WrongType {
            key,
            expected: "a string",
        }),
    }
}

fn boolean(gguf: &Gguf<'_>, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    match gguf.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(TokenizerError::WrongType {
            key,
            expected: "a bool",
        }),
    }
}

/// Sets `slot` from `key` when present and inside the vocabulary (llama.cpp
/// warns about and ignores ids outside it).
fn read_id(
    gguf: &Gguf<'_>,
    key: &'static str,
    n_vocab: usize,
    slot: &mut Option<u32>,
) -> Result<(), TokenizerError> {
    if let Some(v) = gguf.get(key) {
        let id = v.as_u64().ok_or(TokenizerError::WrongType {
            key,
            expected: "an unsigned integer",
        })?;
        if id < n_vocab as u64 {
            *slot = Some(id as u32);
        }
    }
    Ok(())
}

fn array<'g, 'a>(
    gguf: &'g Gguf<'a>,
    key: &'static str,
    expected: &'static str,
) -> Result<Option<&'g Array<'a>>, TokenizerError> {
    match gguf.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(TokenizerError::WrongType { key, expected }),
    }
}

fn strings<'a>(gguf: &Gguf<'a>, key: &'static str) -> Result<Option<Vec<&'a str>>, TokenizerError> {
    const EXPECTED: &str = "an array of strings";
    let Some(a) = array(gguf, key, EXPECTED)? else {
        return Ok(None);
    };
    let items: Vec<&'a str> = a
        .strings()
        .ok_or(TokenizerError::WrongType {
            key,
            expected: EXPECTED,
        })?
        .collect();
    // The iterator stops at the first string that is not UTF-8.
    if items.len() != a.len() {
        return Err(TokenizerError::UnreadableToken { index: items.len() });
    }
    Ok(Some(items))
}
