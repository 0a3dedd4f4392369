//! Text to token ids and back, matching llama.cpp's `llama_tokenize` token for token.
//!
//! Two vocabulary families are supported, as GGUF names them in
//! `tokenizer.ggml.model`:
//! - `llama`: SentencePiece-style (Gemma 3, TinyLlama, Llama 2, Mistral):
//!   spaces become U+2581, characters merge by highest token score, and
//!   characters that no token covers fall back to `<0xXX>` byte tokens.
//! - `gpt2`: byte-level BPE (Llama 3, Qwen2, SmolLM, ...): a regex-like
//!   pre-tokenizer chosen by `tokenizer.ggml.pre` splits the text into words,
//!   bytes map to printable characters, and pairs merge by merge rank.
//!
//! Before either runs, special tokens are cut out of the text
//! (module `special`): user-defined tokens always, control tokens only when the
//! caller asks to parse specials (for chat templates).
//!
//! The core works from a plain [`VocabSpec`]; [`Tokenizer::from_gguf`] fills
//! one from a model file with llama.cpp's defaults.
//!
//! Supported `tokenizer.ggml.pre` values ([`PreTokenizer::from_gguf_name`]):
//! none or "default"; the GPT-2 family ("gpt-2", "phi-2", "mpt", "olmo", ...);
//! the Llama 3 family ("llama-bpe", "llama3", "dbrx", "smaug-bpe", ...); the
//! Qwen2 family ("qwen2", "deepseek-r1-qwen", "stablelm2", ...); and the
//! StarCoder family ("smollm", "starcoder", "refact", ...). Other values are
//! refused with an error naming them (llama.cpp has more hand-made ones, and
//! refuses names it does not know too).
//!
//! Known differences from llama.cpp, all on malformed vocabularies: a
//! character that neither a token nor byte tokens cover becomes `<unk>`
//! (llama.cpp throws); empty token texts are never matched (llama.cpp names
//! them `[EMPTY_<id>]`); among special tokens of equal length, the lower id
//! is tried first (llama.cpp's order there is its sort's); the LSTRIP/RSTRIP
//! attributes llama.cpp sets for a few models by name (Phi-3, Jina) are not applied.

mod bpe;
mod gguf_vocab;
mod index;
mod pretokenize;
mod special;
mod spm;
mod stream;
mod symbols;
#[cfg(test)]
mod tests;

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

pub use pretokenize::{PreTokenizer, PreTokenizerDefaults};
pub use stream::StreamDecoder;

use index::{MergeIndex, TokenIndex};
use special::{Fragment, SpecialTokens};
use symbols::Symbol;

/// Why a vocabulary can't be used.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerError {
    MissingKey {
        key: &'static str,
    },
    WrongType {
        key: &'static str,
        expected: &'static str,
    },
    UnsupportedModel(String),
    UnsupportedPreTokenizer(String),
    EmptyVocabulary,
    TooManyTokens(usize),
    /// A per-token array (scores, types) is shorter than the token list.
    ShortArray {
        key: &'static str,
        len: usize,
        n_tokens: usize,
    },
    /// A token's text is not valid UTF-8.
    UnreadableToken {
        index: usize,
    },
    DuplicateToken {
        text: String,
        first: u32,
        second: u32,
    },
    SpecialTokenOutOfRange {
        which: &'static str,
        id: u32,
        n_vocab: usize,
    },
    /// `add_bos`/`add_eos` is set but the model has no such token.
    MissingSpecialToken {
        flag: &'static str,
        which: &'static str,
    },
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingKey { key } => write!(f, "the model file lacks {key:?}"),
            Self::WrongType { key, expected } => write!(f, "{key:?} should be {expected}"),
            Self::UnsupportedModel(m) => write!(
                f,
                "tokenizer model {m:?} is not supported (supported: \"llama\" SentencePiece, \"gpt2\" byte-level BPE)"
            ),
            Self::UnsupportedPreTokenizer(p) => write!(
                f,
                "pre-tokenizer {p:?} is not supported (supported: default, gpt-2 family, llama3/llama-bpe family, \
                 qwen2 family, smollm/starcoder family)"
            ),
            Self::EmptyVocabulary => write!(f, "the vocabulary has no tokens"),
            Self::TooManyTokens(n) => write!(f, "the vocabulary has {n} tokens, more than token ids can address"),
            Self::ShortArray { key, len, n_tokens } => {
                write!(f, "{key:?} has {len} entries for {n_tokens} tokens")
            }
            Self::UnreadableToken { index } => write!(f, "token {index} is not valid UTF-8"),
            Self::DuplicateToken { text, first, second } => {
                write!(f, "token text {text:?} appears twice in the vocabulary (ids {first} and {second})")
            }
            Self::SpecialTokenOutOfRange { which, id, n_vocab } => {
                write!(f, "{which} token id {id} is outside the vocabulary (size {n_vocab})")
            }
            Self::MissingSpecialToken { flag, which } => {
                write!(f, "{flag} is set but the model defines no {which} token")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for TokenizerError {}

/// GGUF's `tokenizer.ggml.token_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    pub fn from_gguf(value: i32) -> Self {
        match value {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

/// Token attributes as llama.cpp keeps them (bit flags; a token can gain
/// CONTROL on top of its type when its text marks it as end-of-turn etc.).
const ATTR_UNKNOWN: u8 = 1;
const ATTR_UNUSED: u8 = 2;
const ATTR_NORMAL: u8 = 4;
const ATTR_CONTROL: u8 = 8;
const ATTR_USER_DEFINED: u8 = 16;
const ATTR_BYTE: u8 = 32;

fn attr_of(t: TokenType) -> u8 {
    match t {
        TokenType::Undefined => 0,
        TokenType::Normal => ATTR_NORMAL,
        TokenType::Unknown => ATTR_UNKNOWN,
        TokenType::Control => ATTR_CONTROL,
        TokenType::UserDefined => ATTR_USER_DEFINED,
        TokenType::Unused => ATTR_UNUSED,
        TokenType::Byte => ATTR_BYTE,
    }
}

/// The two tokenizer families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// `tokenizer.ggml.model = llama`
    SentencePiece,
    /// `tokenizer.ggml.model = gpt2`
    BytePairEncoding,
}

/// Ids of the tokens with a role (None: the model has none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End of turn (`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`, ...); found by text when unset.
    pub eot: Option<u32>,
    /// End of message (`<|eom_id|>`); found by text when unset.
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    /// The next three end generation too (llama.cpp's rule).
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

/// Everything a tokenizer is built from, independent of the file format.
#[derive(Debug, Clone)]
pub struct VocabSpec<'a> {
    pub kind: TokenizerKind,
    /// Used by byte-level BPE only.
    pub pre: PreTokenizer,
    pub tokens: Vec<&'a str>,
    /// Per token (empty: all 0). SentencePiece merges by these.
    pub scores: Vec<f32>,
    /// Per token (empty: all normal).
    pub token_types: Vec<TokenType>,
    /// BPE merges, "left right", best first.
    pub merges: Vec<&'a str>,
    pub special: SpecialIds,
    /// Add BOS / EOS when encoding with `add_special`.
    pub add_bos: bool,
    pub add_eos: bool,
    /// SentencePiece: prefix a space to text at the start and after special tokens.
    pub add_space_prefix: bool,
    /// BPE: a word that is a whole token skips the merges.
    pub ignore_merges: bool,
    /// [`Tokenizer::decode`] removes spaces before punctuation (GPT-2 style cleanup).
    pub clean_spaces: bool,
}

impl<'a> VocabSpec<'a> {
    /// llama.cpp's defaults for a `tokenizer.ggml.model` value (`llama` or
    /// `gpt2`) and `tokenizer.ggml.pre` value. Default special ids outside
    /// the vocabulary are dropped, as llama.cpp does.
    pub fn with_defaults(
        model: &str,
        pre: Option<&str>,
        tokens: Vec<&'a str>,
    ) -> Result<Self, TokenizerError> {
        let mut spec = match model {
            "llama" => VocabSpec {
                kind: TokenizerKind::SentencePiece,
                pre: PreTokenizer::Default,
                tokens,
                scores: Vec::new(),
                token_types: Vec::new(),
                merges: Vec::new(),
                special: SpecialIds {
                    bos: Some(1),
                    eos: Some(2),
                    unk: Some(0),
                    ..SpecialIds::default()
                },
                add_bos: true,
                add_eos: false,
                add_space_prefix: true,
                ignore_merges: false,
                clean_spaces: false,
            },
            "gpt2" => {
                let d = PreTokenizer::from_gguf_name(pre).ok_or_else(|| {
                    TokenizerError::UnsupportedPreTokenizer(String::from(pre.unwrap_or("")))
                })?;
                VocabSpec {
                    kind: TokenizerKind::BytePairEncoding,
                    pre: d.pre,
                    tokens,
                    scores: Vec::new(),
                    token_types: Vec::new(),
                    merges: Vec::new(),
                    special: SpecialIds {
                        bos: if d.no_bos { None } else { Some(11) },
                        eos: Some(11),
                        ..SpecialIds::default()
                    },
                    add_bos: d.add_bos,
                    add_eos: false,
                    add_space_prefix: false,
                    ignore_merges: d.ignore_merges,
                    clean_spaces: d.clean_spaces,
                }
            }
            other => return Err(TokenizerError::UnsupportedModel(String::from(other))),
        };
        let n = spec.tokens.len();
        for id in [
            &mut spec.special.bos,
            &mut spec.special.eos,
            &mut spec.special.unk,
        ] {
            if id.is_some_and(|i| i as usize >= n) {
                *id = None;
            }
        }
        Ok(spec)
    }
}

/// A ready tokenizer; borrows token texts from the model file.
pub struct Tokenizer<'a> {
    kind: TokenizerKind,
    pre: PreTokenizer,
    tokens: Vec<&'a str>,
    scores: Vec<f32>,
    attrs: Vec<u8>,
    index: TokenIndex,
    /// BPE merge lines, and (left, right) -> rank over them.
    merges: Vec<&'a str>,
    merge_index: MergeIndex,
    special_tokens: SpecialTokens,
    /// SentencePiece byte fallback: the token for each byte, if any.
    byte_tokens: [Option<u32>; 256],
    /// What each token decodes to (with specials rendered), where that is not
    /// its text: a range of `piece_bytes`, or [`PIECE_IS_TEXT`].
    piece_spans: Vec<(u32, u32)>,
    piece_bytes: Vec<u8>,
    special: SpecialIds,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    ignore_merges: bool,
    clean_spaces: bool,
}

impl fmt::Debug for Tokenizer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("pre", &self.pre)
            .field("n_vocab", &self.tokens.len())
            .field("n_merges", &self.merge_index.len())
            .field("special", &self.special)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

impl<'a> Tokenizer<'a> {
    /// Reads `tokenizer.ggml.*` from a model file (llama.cpp's keys and defaults).
    pub fn from_gguf(gguf: &crate::gguf::Gguf<'a>) -> Result<Self, TokenizerError> {
        gguf_vocab::spec_from_gguf(gguf).and_then(Self::new)
    }

    pub fn new(spec: VocabSpec<'a>) -> Result<Self, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocabulary);
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::TooManyTokens(n));
        }
        let mut scores = spec.scores;
        if scores.is_empty() {
            scores.resize(n, 0.0);
        } else if scores.len() < n {
            return Err(TokenizerError::ShortArray {
                key: "tokenizer.ggml.scores",
                len: scores.len(),
                n_tokens: n,
            });
        }
        let mut attrs: Vec<u8> = if spec.token_types.is_empty() {
            alloc::vec![ATTR_NORMAL; n]
        } else if spec.token_types.len() < n {
            return Err(TokenizerError::ShortArray {
                key: "tokenizer.ggml.token_type",
                len: spec.token_types.len(),
                n_tokens: n,
            });
        } else {
            spec.token_types[..n].iter().map(|&t| attr_of(t)).collect()
        };

        // llama.cpp reads token texts as C strings: a NUL byte ends them.
        let mut tokens = spec.tokens;
        for text in tokens.iter_mut().filter(|t| t.as_bytes().contains(&0)) {
            *text = text.split('\0').next().unwrap_or_default();
        }
        // llama.cpp renames empty tokens "[EMPTY_<id>]"; here they are never matched.
        let index =
            TokenIndex::new(&tokens).map_err(|(first, second)| TokenizerError::DuplicateToken {
                text: String::from(tokens[second as usize]),
                first,
                second,
            })?;
        let lookup = |text: &str| index.get(&tokens, text);

        let mut special = spec.special;
        for (which, id) in special_id_fields(&special) {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(TokenizerError::SpecialTokenOutOfRange {
                        which,
                        id,
                        n_vocab: n,
                    });
                }
            }
        }
        if spec.add_bos && special.bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "add_bos",
                which: "BOS",
            });
        }
        if spec.add_eos && special.eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "add_eos",
                which: "EOS",
            });
        }
        let eog = detect_roles(&tokens, lookup, &mut attrs, &mut special);

        let special_tokens =
            SpecialTokens::new(tokens.iter().enumerate().filter_map(|(id, &text)| {
                let a = attrs[id];
                (a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0).then_some((
                    id as u32,
                    text,
                    a & (ATTR_CONTROL | ATTR_UNKNOWN) != 0,
                ))
            }));

        let mut byte_tokens = [None; 256];
        if spec.kind == TokenizerKind::SentencePiece {
            for (b, slot) in byte_tokens.iter_mut().enumerate() {
                let hex = byte_token_text(b as u8);
                // Fall back to the byte itself as a token, as llama.cpp does.
                let hex = core::str::from_utf8(&hex).unwrap_or_default();
                let single = [b as u8];
                let single = core::str::from_utf8(&single).ok();
                *slot = lookup(hex).or_else(|| single.and_then(lookup));
            }
        }

        let merges = match spec.kind {
            TokenizerKind::BytePairEncoding => spec.merges,
            TokenizerKind::SentencePiece => Vec::new(),
        };
        let merge_index = MergeIndex::new(&merges);

        let mut tokenizer = Tokenizer {
            kind: spec.kind,
            pre: spec.pre,
            tokens,
            scores,
            attrs,
            index,
            merges,
            merge_index,
            special_tokens,
            byte_tokens,
            piece_spans: Vec::new(),
            piece_bytes: Vec::new(),
            special,
            eog,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            add_space_prefix: spec.add_space_prefix,
            ignore_merges: spec.ignore_merges,
            clean_spaces: spec.clean_spaces,
        };
        tokenizer.build_pieces();
        Ok(tokenizer)
    }

    /// Decodes every token once (llama.cpp's `token_to_piece` with specials
    /// rendered), keeping only the pieces that differ from the token's text.
    fn build_pieces(&mut self) {
        let mut bytes = Vec::new();
        let mut spans = Vec::with_capacity(self.tokens.len());
        for (id, &text) in self.tokens.iter().enumerate() {
            let attr = self.attrs[id];
            let start = bytes.len();
            if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
                spans.push(PIECE_IS_TEXT);
                continue;
            } else if attr & ATTR_NORMAL != 0 {
                match self.kind {
                    TokenizerKind::SentencePiece => {
                        if !unescape_spaces(text, &mut bytes) {
                            spans.push(PIECE_IS_TEXT);
                            continue;
                        }
                    }
                    // Printable ASCII stands for itself in GPT-2's byte mapping.
                    TokenizerKind::BytePairEncoding
                        if text.bytes().all(|b| (0x21..=0x7e).contains(&b)) =>
                    {
                        spans.push(PIECE_IS_TEXT);
                        continue;
                    }
                    TokenizerKind::BytePairEncoding => bpe::decode_text(text, &mut bytes),
                }
            } else if attr & ATTR_BYTE != 0 {
                bytes.push(parse_byte_token(text));
            }
            spans.push((start as u32, (bytes.len() - start) as u32));
        }
        self.piece_bytes = bytes;
        self.piece_spans = spans;
    }

    /// Token ids for `text`, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`:
    /// `add_special` adds BOS/EOS per the model's flags; `parse_special` lets
    /// control tokens written in the text (e.g. `<start_of_turn>`) become those tokens.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.special.bos);
        }
        let fragments = self.special_tokens.partition(text, parse_special);
        let mut symbols = Vec::new();
        let mut scratch = String::new();
        let mut prev_special = true;
        for fragment in fragments {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(range) => {
                    let piece = &text[range];
                    match self.kind {
                        TokenizerKind::SentencePiece => self.encode_spm(
                            piece,
                            self.add_space_prefix && prev_special,
                            &mut scratch,
                            &mut symbols,
                            &mut out,
                        ),
                        TokenizerKind::BytePairEncoding => {
                            self.encode_bpe(piece, &mut scratch, &mut symbols, &mut out)
                        }
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.special.eos);
        }
        out
    }

    fn encode_spm(
        &self,
        text: &str,
        space_prefix: bool,
        escaped: &mut String,
        symbols: &mut Vec<Symbol>,
        out: &mut Vec<u32>,
    ) {
        escaped.clear();
        if space_prefix {
            escaped.push('\u{2581}');
        }
        escaped.extend(text.chars().map(|c| if c == ' ' { '\u{2581}' } else { c }));
        spm::merge(
            escaped,
            |s| self.lookup(s).map(|id| self.scores[id as usize]),
            symbols,
        );
        for symbol in symbols.iter() {
            let piece = symbol.text(escaped);
            if let Some(id) = self.lookup(piece) {
                out.push(id);
                continue;
            }
            // Unmerged characters that are not tokens: one token per byte, or
            // the unknown token when the vocabulary lacks byte tokens.
            if piece
                .bytes()
                .all(|b| self.byte_tokens[usize::from(b)].is_some())
            {
                out.extend(
                    piece
                        .bytes()
                        .filter_map(|b| self.byte_tokens[usize::from(b)]),
                );
            } else {
                out.extend(self.special.unk);
            }
        }
    }

    fn encode_bpe(
        &self,
        text: &str,
        word: &mut String,
        symbols: &mut Vec<Symbol>,
        out: &mut Vec<u32>,
    ) {
        let chars: Vec<char> = text.chars().collect();
        let mut byte_start = 0;
        let mut char_start = 0;
        for len in self.pre.split(&chars) {
            let byte_len: usize = chars[char_start..char_start + len]
                .iter()
                .map(|c| c.len_utf8())
                .sum();
            word.clear();
            bpe::encode_bytes(&text[byte_start..byte_start + byte_len], word);
            char_start += len;
            byte_start += byte_len;
            if self.ignore_merges {
                if let Some(id) = self.lookup(word) {
                    out.push(id);
                    continue;
                }
            }
            bpe::merge_word(
                word,
                |l, r| self.merge_index.rank(&self.merges, l, r),
                symbols,
            );
            for symbol in symbols.iter() {
                let piece = symbol.text(word);
                match self.lookup(piece) {
                    Some(id) => out.push(id),
                    // llama.cpp then looks up each raw byte of the encoded text as a token.
                    None => out.extend(piece.bytes().filter_map(|b| {
                        let single = [b];
                        core::str::from_utf8(&single)
                            .ok()
                            .and_then(|s| self.lookup(s))
                    })),
                }
            }
        }
    }

    /// The bytes token `id` stands for (U+2581 as space, byte tokens as
    /// their byte, GPT-2 characters as their bytes). Control and unknown
    /// tokens are empty unless `render_special`; ids outside the vocabulary are empty.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> &[u8] {
        let i = id as usize;
        let Some(&attr) = self.attrs.get(i) else {
            return &[];
        };
        if !render_special && attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
            return &[];
        }
        match self.piece_spans[i] {
            PIECE_IS_TEXT => self.tokens[i].as_bytes(),
            (start, len) => &self.piece_bytes[start as usize..(start + len) as usize],
        }
    }

    /// Text for a token sequence, as llama.cpp's `llama_detokenize(remove_special = false)`:
    /// the first token loses one leading space when the model adds a space
    /// prefix, and BPE models that ask for it get their spaces cleaned.
    /// Invalid UTF-8 comes out as U+FFFD.
    pub fn decode(&self, ids: &[u32], render_special: bool) -> String {
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let mut piece = self.token_bytes(id, render_special);
            if i == 0 && self.add_space_prefix {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            bytes.extend_from_slice(piece);
        }
        if self.clean_spaces {
            clean_spaces(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// The pre-tokenizer (meaningful for BPE vocabularies).
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    pub fn bos(&self) -> Option<u32> {
        self.special.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.special.eos
    }

    /// The special token ids after llama.cpp's detection of end-of-turn tokens by text.
    pub fn special_ids(&self) -> &SpecialIds {
        &self.special
    }

    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    pub fn adds_eos(&self) -> bool {
        self.add_eos
    }

    fn lookup(&self, text: &str) -> Option<u32> {
        self.index.get(&self.tokens, text)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.lookup(text)
    }

    /// The token's text as stored in the vocabulary ("" outside it).
    pub fn token_text(&self, id: u32) -> &'a str {
        self.tokens.get(id as usize).copied().unwrap_or("")
    }

    pub fn token_score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    /// Control tokens (including those llama.cpp promotes by their text); rendered only on request.
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|&a| a & ATTR_CONTROL != 0)
    }

    /// Whether generating `id` ends the turn: EOS, EOT, EOM and the tokens
    /// llama.cpp recognises by text (`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`, ...).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, ascending.
    pub fn end_of_generation_tokens(&self) -> &[u32] {
        &self.eog
    }
}

/// Appends `text` with U+2581 (E2 96 81) turned into spaces, if it has any;
/// returns false (appending nothing) if it has none. A byte scan: this runs
/// over whole vocabularies.
fn unescape_spaces(text: &str, out: &mut Vec<u8>) -> bool {
    const ESCAPED: [u8; 3] = [0xE2, 0x96, 0x81];
    let bytes = text.as_bytes();
    if !bytes.windows(3).any(|w| w == ESCAPED) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(&ESCAPED) {
            out.push(b' ');
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    true
}

/// Marks a token whose decoded bytes are its text.
const PIECE_IS_TEXT: (u32, u32) = (u32::MAX, 0);

fn special_id_fields(s: &SpecialIds) -> [(&'static str, Option<u32>); 12] {
    [
        ("BOS", s.bos),
        ("EOS", s.eos),
        ("EOT", s.eot),
        ("EOM", s.eom),
        ("UNK", s.unk),
        ("PAD", s.pad),
        ("FIM prefix", s.fim_pre),
        ("FIM suffix", s.fim_suf),
        ("FIM middle", s.fim_mid),
        ("FIM pad", s.fim_pad),
        ("FIM repo", s.fim_rep),
        ("FIM separator", s.fim_sep),
    ]
}

/// `<0xXX>` for a byte (upper-case hex, as llama.cpp looks it up).
fn byte_token_text(b: u8) -> [u8; 6] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    [
        b'<',
        b'0',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 15)],
        b'>',
    ]
}

/// The byte of a `<0xXX>` token, read like llama.cpp's `strtol(text.substr(3, 2), 16)`.
fn parse_byte_token(text: &str) -> u8 {
    let digits = text.as_bytes().get(3..).unwrap_or_default();
    let mut value = 0u8;
    for &d in digits.iter().take(2) {
        match (d as char).to_digit(16) {
            Some(v) => value = value.wrapping_mul(16).wrapping_add(v as u8),
            None => break,
        }
    }
    value
}

/// Texts by which llama.cpp recognises roles when the file does not name them.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<\u{ff5c}fim\u{2581}begin\u{ff5c}>",
    "<PRE>",
    "\u{2581}<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<\u{ff5c}fim\u{2581}hole\u{ff5c}>",
    "<SUF>",
    "\u{2581}<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<\u{ff5c}fim\u{2581}end\u{ff5c}>",
    "<MID>",
    "\u{2581}<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Texts that end generation whatever the file says.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
];
/// gpt-oss tokens llama.cpp always renders.
const ALWAYS_RENDERED_TEXTS: &[&str] =
    &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// llama.cpp's detection of role tokens by text, the CONTROL attribute it
/// adds to them, and the resulting end-of-generation set (sorted).
fn detect_roles(
    tokens: &[&str],
    lookup: impl Fn(&str) -> Option<u32>,
    attrs: &mut [u8],
    special: &mut SpecialIds,
) -> Vec<u32> {
    let ids_of = |texts: &'static [&'static str]| texts.iter().filter_map(|t| lookup(t));
    {
        let roles: [(&mut Option<u32>, &[&str]); 8] = [
            (&mut special.eot, EOT_TEXTS),
            (&mut special.eom, EOM_TEXTS),
            (&mut special.fim_pre, FIM_PRE_TEXTS),
            (&mut special.fim_suf, FIM_SUF_TEXTS),
            (&mut special.fim_mid, FIM_MID_TEXTS),
            (&mut special.fim_pad, FIM_PAD_TEXTS),
            (&mut special.fim_rep, FIM_REP_TEXTS),
            (&mut special.fim_sep, FIM_SEP_TEXTS),
        ];
        // llama.cpp walks a hash map and keeps the first match; we take the lowest id.
        for (slot, texts) in roles {
            if slot.is_none() {
                if let Some(id) = ids_of(texts).min() {
                    *slot = Some(id);
                    attrs[id as usize] |= ATTR_CONTROL;
                }
            }
        }
    }
    let mut eog: Vec<u32> = [special.fim_pad, special.fim_rep, special.fim_sep]
        .into_iter()
        .flatten()
        .collect();
    for id in ids_of(EOG_TEXTS) {
        eog.push(id);
        attrs[id as usize] |= ATTR_CONTROL;
    }
    for id in ids_of(ALWAYS_RENDERED_TEXTS) {
        attrs[id as usize] = ATTR_USER_DEFINED;
    }
    eog.extend(
        [special.eos, special.eot, special.eom]
            .into_iter()
            .flatten(),
    );
    eog.sort_unstable();
    eog.dedup();
    let find =
        |eog: &[u32], text: &str| eog.iter().copied().find(|&id| tokens[id as usize] == text);
    // gpt-oss and solar-open: "<|end|>" ends a message, not the generation.
    let end = find(&eog, "<|end|>");
    let has_return = find(&eog, "<|return|>").is_some();
    let has_call = find(&eog, "<|call|>").is_some() || find(&eog, "<|calls|>").is_some();
    let has_flush = find(&eog, "<|flush|>").is_some();
    if let Some(end) = end {
        if has_call && (has_return || has_flush) {
            eog.retain(|&id| id != end);
            attrs[end as usize] = ATTR_USER_DEFINED;
        }
    }
    // Gemma 4 and PaddleOCR: "</s>" is text there.
    if let (Some(s), true) = (find(&eog, "</s>"), find(&eog, "<|tool_response>").is_some()) {
        eog.retain(|&id| id != s);
        attrs[s as usize] = ATTR_NORMAL;
    }
    eog
}

/// llama.cpp's detokenizer cleanup for BPE models, pass for pass (in place,
/// like the original, whose later checks see the earlier passes' writes):
/// " ?", " !", " .", " ," lose the space, " ' " loses both spaces, and
/// " 's", " 'm", " 're", " 've" lose theirs.
fn clean_spaces(text: &mut Vec<u8>) {
    let n = text.len();
    let mut total = n.min(1);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);

    let n = text.len();
    let mut total = n.min(1);
    let mut i = 1;
    while i < n {
        let x = text[i];
        if x == b'\'' && i + 1 < n && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }
    text.truncate(total);

    let n = text.len();
    let mut total = n.min(1);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < n {
            let remove = match text[i + 1] {
                b's' | b'm' => true,
                b'r' | b'v' => i + 2 < n && text[i + 2] == b'e',
                _ => false,
            };
            if remove {
                total -= 1;
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}
