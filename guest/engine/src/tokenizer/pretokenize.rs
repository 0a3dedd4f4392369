//! Pre-tokenization of byte-level BPE models: splitting text into words
//! before merges, as llama.cpp does it for each `tokenizer.ggml.pre`.
//!
//! llama.cpp runs a list of regexes per pre-tokenizer; each regex splits every
//! piece left by the previous one into its matches and the gaps between them.
//! The GPT-2 and Llama 3 regexes have hand-written matchers in llama.cpp
//! (`unicode_regex_split_custom_*`), ported here with their quirks. The other
//! regexes run through `std::regex` on a "collapsed" text where every
//! non-ASCII code point stands for its category; [`Collapsed`] reproduces
//! that view, and the matchers below implement those regexes with the
//! leftmost-first semantics of ECMAScript regexes.

use alloc::vec::Vec;

use unicode_general_category::{get_general_category, GeneralCategory};

/// The regex list llama.cpp uses for a `tokenizer.ggml.pre` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// No or "default" `pre`: punctuation runs, the GPT-2 regex, number runs, digit triples.
    Default,
    /// The GPT-2 regex: "gpt-2", "phi-2", "mpt", "olmo", "jais", ...
    Gpt2,
    /// The Llama 3 regex (digits in groups of up to 3): "llama-bpe", "llama3", "dbrx", "smaug-bpe", ...
    Llama3,
    /// The Qwen2 regex (single digits): "qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", ...
    Qwen2,
    /// Single digits, then the GPT-2 regex: "smollm", "starcoder", "refact", "command-r", ...
    StarCoder,
}

/// How llama.cpp configures a BPE vocabulary for a `tokenizer.ggml.pre` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreTokenizerDefaults {
    pub pre: PreTokenizer,
    /// A word that is a whole token is emitted without running merges.
    pub ignore_merges: bool,
    /// Detokenization removes spaces before punctuation and some contractions.
    pub clean_spaces: bool,
    /// BOS is added unless `tokenizer.ggml.add_bos_token` says otherwise.
    pub add_bos: bool,
    /// The model has no BOS token by default.
    pub no_bos: bool,
}

impl PreTokenizer {
    /// The llama.cpp configuration for a `tokenizer.ggml.pre` value (`None` when
    /// the key is missing), or `None` for a value this engine does not implement.
    pub fn from_gguf_name(name: Option<&str>) -> Option<PreTokenizerDefaults> {
        let base = |pre| PreTokenizerDefaults {
            pre,
            ignore_merges: false,
            clean_spaces: true,
            add_bos: false,
            no_bos: false,
        };
        let name = match name {
            None | Some("") | Some("default") => return Some(base(PreTokenizer::Default)),
            Some(n) => n,
        };
        let defaults = match name {
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" => PreTokenizerDefaults {
                ignore_merges: true,
                add_bos: true,
                ..base(PreTokenizer::Llama3)
            },
            "dbrx" | "smaug-bpe" => base(PreTokenizer::Llama3),
            "glm4" | "chatglm-bpe" => PreTokenizerDefaults {
                no_bos: true,
                ..base(PreTokenizer::Llama3)
            },
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais"
            | "exaone4" => base(PreTokenizer::Gpt2),
            "trillion" | "granite-docling" => PreTokenizerDefaults {
                clean_spaces: false,
                ..base(PreTokenizer::Gpt2)
            },
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open" => {
                PreTokenizerDefaults {
                    clean_spaces: false,
                    ..base(PreTokenizer::Qwen2)
                }
            }
            "stablelm2" | "megrez" => base(PreTokenizer::Qwen2),
            "smollm" | "command-r" => PreTokenizerDefaults {
                clean_spaces: false,
                ..base(PreTokenizer::StarCoder)
            },
            "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
                base(PreTokenizer::StarCoder)
            }
            _ => return None,
        };
        Some(defaults)
    }

    /// Splits `text` into words (as code point counts, in order).
    pub fn split(self, text: &[char]) -> Vec<usize> {
        let mut pieces = alloc::vec![text.len()];
        let passes: &[SplitPass] = match self {
            PreTokenizer::Default => &[
                split_punctuation_runs,
                split_gpt2,
                split_number_runs,
                split_ascii_digit_triples,
            ],
            PreTokenizer::Gpt2 => &[split_gpt2],
            PreTokenizer::Llama3 => &[split_llama3],
            PreTokenizer::Qwen2 => &[split_qwen2],
            PreTokenizer::StarCoder => &[split_single_numbers, split_gpt2],
        };
        for pass in passes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            let mut start = 0;
            for &len in &pieces {
                pass(&text[start..start + len], &mut next);
                start += len;
            }
            pieces = next;
        }
        pieces
    }
}

/// One regex of a pre-tokenizer: appends the pieces it cuts a piece into.
type SplitPass = fn(&[char], &mut Vec<usize>);

/// The category flags llama.cpp keeps per code point (`unicode_cpt_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Category {
    Number,
    Letter,
    Separator,
    Mark,
    Punctuation,
    Symbol,
    /// Cc, Cf, Cs, Co and unassigned code points.
    Control,
}

pub(crate) fn category(c: char) -> Category {
    if c.is_ascii() {
        return match c {
            '0'..='9' => Category::Number,
            'a'..='z' | 'A'..='Z' => Category::Letter,
            ' ' => Category::Separator,
            '$' | '+' | '<' | '=' | '>' | '^' | '`' | '|' | '~' => Category::Symbol,
            '\0'..='\x1f' | '\x7f' => Category::Control,
            _ => Category::Punctuation,
        };
    }
    use GeneralCategory as G;
    match get_general_category(c) {
        G::UppercaseLetter
        | G::LowercaseLetter
        | G::TitlecaseLetter
        | G::ModifierLetter
        | G::OtherLetter => Category::Letter,
        G::NonspacingMark | G::SpacingMark | G::EnclosingMark => Category::Mark,
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => Category::Number,
        G::ConnectorPunctuation
        | G::DashPunctuation
        | G::OpenPunctuation
        | G::ClosePunctuation
        | G::InitialPunctuation
        | G::FinalPunctuation
        | G::OtherPunctuation => Category::Punctuation,
        G::MathSymbol | G::CurrencySymbol | G::ModifierSymbol | G::OtherSymbol => Category::Symbol,
        G::SpaceSeparator | G::LineSeparator | G::ParagraphSeparator => Category::Separator,
        G::Control | G::Format | G::Surrogate | G::PrivateUse | G::Unassigned => Category::Control,
        _ => Category::Control,
    }
}

/// The Unicode White_Space property (what Python's `regex` module calls `\s`).
pub(crate) fn is_whitespace(c: char) -> bool {
    matches!(c, '\t'..='\r' | ' ' | '\u{85}' | '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200a}')
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
        )
}

/// What llama.cpp's hand-written matchers look at: category and whitespace,
/// or nothing past the end of the piece.
#[derive(Clone, Copy)]
struct Flags {
    in_range: bool,
    whitespace: bool,
    letter: bool,
    number: bool,
}

const OUT_OF_RANGE: Flags = Flags {
    in_range: false,
    whitespace: false,
    letter: false,
    number: false,
};

fn flags_at(text: &[char], pos: usize) -> Flags {
    match text.get(pos) {
        None => OUT_OF_RANGE,
        Some(&c) => {
            let cat = category(c);
            Flags {
                in_range: true,
                whitespace: is_whitespace(c),
                letter: cat == Category::Letter,
                number: cat == Category::Number,
            }
        }
    }
}

/// Collects piece lengths the way llama.cpp's `_add_token` does (empty pieces dropped).
struct Pieces<'o> {
    out: &'o mut Vec<usize>,
    prev_end: usize,
}

impl Pieces<'_> {
    fn cut(&mut self, end: usize) -> usize {
        let len = end - self.prev_end;
        if len > 0 {
            self.out.push(len);
        }
        self.prev_end = end;
        len
    }
}

/// `'s|'t|'re|'ve|'m|'ll|'d`, optionally ASCII-case-insensitive: the match length.
fn contraction(text: &[char], pos: usize, any_case: bool) -> Option<usize> {
    if text.get(pos) != Some(&'\'') {
        return None;
    }
    let at = |i: usize| {
        text.get(i)
            .map(|&c| if any_case { c.to_ascii_lowercase() } else { c })
    };
    match at(pos + 1)? {
        's' | 't' | 'm' | 'd' => Some(2),
        first => match (first, at(pos + 2)?) {
            ('r', 'e') | ('v', 'e') | ('l', 'l') => Some(3),
            _ => None,
        },
    }
}

/// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
fn split_gpt2(text: &[char], out: &mut Vec<usize>) {
    let mut pieces = Pieces { out, prev_end: 0 };
    let mut pos = 0;
    while pos < text.len() {
        let c = text[pos];
        if let Some(len) = contraction(text, pos, false) {
            pos += pieces.cut(pos + len);
            continue;
        }
        let mut flags = if c == ' ' {
            flags_at(text, pos + 1)
        } else {
            flags_at(text, pos)
        };
        if flags.letter {
            pos += usize::from(c == ' ');
            while flags.letter {
                pos += 1;
                flags = flags_at(text, pos);
            }
            pieces.cut(pos);
            continue;
        }
        if flags.number {
            pos += usize::from(c == ' ');
            while flags.number {
                pos += 1;
                flags = flags_at(text, pos);
            }
            pieces.cut(pos);
            continue;
        }
        let is_other = |f: Flags| f.in_range && !(f.whitespace || f.letter || f.number);
        if is_other(flags) {
            pos += usize::from(c == ' ');
            while is_other(flags) {
                pos += 1;
                flags = flags_at(text, pos);
            }
            pieces.cut(pos);
            continue;
        }
        let spaces = whitespace_run(text, pos);
        if spaces > 1 && pos + spaces < text.len() {
            pos += spaces - 1;
            pieces.cut(pos);
            continue;
        }
        if spaces > 0 {
            pos += spaces;
            pieces.cut(pos);
            continue;
        }
        pos += 1;
        pieces.cut(pos);
    }
}

fn whitespace_run(text: &[char], pos: usize) -> usize {
    text[pos..]
        .iter()
        .take_while(|&&c| is_whitespace(c))
        .count()
}

/// Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
fn split_llama3(text: &[char], out: &mut Vec<usize>) {
    let mut pieces = Pieces { out, prev_end: 0 };
    let mut pos = 0;
    while pos < text.len() {
        let c = text[pos];
        let flags = flags_at(text, pos);
        if let Some(len) = contraction(text, pos, true) {
            pos += pieces.cut(pos + len);
            continue;
        }
        if !(c == '\r' || c == '\n' || flags.number)
            && (flags.letter || flags_at(text, pos + 1).letter)
        {
            pos += 1;
            while flags_at(text, pos).letter {
                pos += 1;
            }
            pieces.cut(pos);
            continue;
        }
        if flags.number {
            let mut group_start = pos;
            while flags_at(text, pos).number {
                pos += 1;
                if pos - group_start >= 3 {
                    pieces.cut(pos);
                    group_start = pos;
                }
            }
            pieces.cut(pos);
            continue;
        }
        let mut flags2 = if c == ' ' {
            flags_at(text, pos + 1)
        } else {
            flags
        };
        let is_other = |f: Flags| !(f.whitespace || f.letter || f.number);
        // llama.cpp tests the range of `flags` (not `flags2`) here; both are in range when pos is.
        if is_other(flags2) && flags.in_range {
            pos += usize::from(c == ' ');
            while is_other(flags2) && flags2.in_range {
                pos += 1;
                flags2 = flags_at(text, pos);
            }
            while matches!(text.get(pos), Some('\r' | '\n')) {
                pos += 1;
            }
            pieces.cut(pos);
            continue;
        }
        let spaces = whitespace_run(text, pos);
        let last_newline_end = text[pos..pos + spaces]
            .iter()
            .rposition(|&c| c == '\r' || c == '\n');
        if let Some(i) = last_newline_end {
            pos += i + 1;
            pieces.cut(pos);
            continue;
        }
        if spaces > 1 && pos + spaces < text.len() {
            pos += spaces - 1;
            pieces.cut(pos);
            continue;
        }
        if spaces > 0 {
            pos += spaces;
            pieces.cut(pos);
            continue;
        }
        pos += 1;
        pieces.cut(pos);
    }
}

/// A code point as llama.cpp's `std::regex` fallback sees it: ASCII as is,
/// anything else collapsed to its category (whitespace first).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Collapsed {
    Ascii(u8),
    Whitespace,
    Number,
    Letter,
    Punctuation,
    Mark,
    Symbol,
    Other,
}

fn collapse(c: char) -> Collapsed {
    if c.is_ascii() {
        return Collapsed::Ascii(c as u8);
    }
    if is_whitespace(c) {
        return Collapsed::Whitespace;
    }
    match category(c) {
        Category::Number => Collapsed::Number,
        Category::Letter => Collapsed::Letter,
        Category::Punctuation => Collapsed::Punctuation,
        Category::Mark => Collapsed::Mark,
        Category::Symbol => Collapsed::Symbol,
        Category::Separator | Category::Control => Collapsed::Other,
    }
}

impl Collapsed {
    /// `\s` (the C locale's isspace for ASCII).
    fn is_space(self) -> bool {
        matches!(
            self,
            Collapsed::Whitespace | Collapsed::Ascii(b'\t'..=b'\r' | b' ')
        )
    }
    /// `\p{L}`
    fn is_letter(self) -> bool {
        matches!(self, Collapsed::Letter)
            || matches!(self, Collapsed::Ascii(b) if b.is_ascii_alphabetic())
    }
    /// `\p{N}`
    fn is_number(self) -> bool {
        matches!(self, Collapsed::Number)
            || matches!(self, Collapsed::Ascii(b) if b.is_ascii_digit())
    }
    /// `[\p{P}\$\+<=>\^~\|]`: llama.cpp's ASCII stand-in for `\p{P}` leaves out '`'.
    fn is_default_punctuation(self) -> bool {
        match self {
            Collapsed::Punctuation => true,
            Collapsed::Ascii(b) => b.is_ascii_punctuation() && b != b'`',
            _ => false,
        }
    }
    fn is_newline(self) -> bool {
        matches!(self, Collapsed::Ascii(b'\r' | b'\n'))
    }
}

/// Splits `text` into the leftmost-first matches of `matcher` (which returns
/// a match length at a position) and the gaps between them, like
/// llama.cpp's `unicode_regex_split_stl`.
fn split_by_matches(
    text: &[char],
    out: &mut Vec<usize>,
    matcher: impl Fn(&[Collapsed], usize) -> Option<usize>,
) {
    let collapsed: Vec<Collapsed> = text.iter().map(|&c| collapse(c)).collect();
    let mut gap_start = 0;
    let mut pos = 0;
    while pos < collapsed.len() {
        match matcher(&collapsed, pos) {
            Some(len) if len > 0 => {
                if pos > gap_start {
                    out.push(pos - gap_start);
                }
                out.push(len);
                pos += len;
                gap_start = pos;
            }
            _ => pos += 1,
        }
    }
    if pos > gap_start {
        out.push(pos - gap_start);
    }
}

fn run_length(text: &[Collapsed], pos: usize, pred: impl Fn(Collapsed) -> bool) -> usize {
    text[pos..].iter().take_while(|&&c| pred(c)).count()
}

/// `\p{N}`
fn split_single_numbers(text: &[char], out: &mut Vec<usize>) {
    split_by_matches(text, out, |t, pos| t[pos].is_number().then_some(1));
}

/// `\p{N}+`
fn split_number_runs(text: &[char], out: &mut Vec<usize>) {
    split_by_matches(text, out, |t, pos| {
        Some(run_length(t, pos, Collapsed::is_number))
    });
}

/// `[\p{P}\$\+<=>\^~\|]+`
fn split_punctuation_runs(text: &[char], out: &mut Vec<usize>) {
    split_by_matches(text, out, |t, pos| {
        Some(run_length(t, pos, Collapsed::is_default_punctuation))
    });
}

/// `[0-9][0-9][0-9]`
fn split_ascii_digit_triples(text: &[char], out: &mut Vec<usize>) {
    split_by_matches(text, out, |t, pos| {
        let digits = run_length(t, pos, |c| matches!(c, Collapsed::Ascii(b'0'..=b'9')));
        (digits >= 3).then_some(3)
    });
}

/// Qwen2: `(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
fn split_qwen2(text: &[char], out: &mut Vec<usize>) {
    split_by_matches(text, out, qwen2_match);
}

fn qwen2_match(t: &[Collapsed], pos: usize) -> Option<usize> {
    let at = |i: usize| t.get(i).copied();
    if at(pos) == Some(Collapsed::Ascii(b'\'')) {
        let lower = |i: usize| match at(i) {
            Some(Collapsed::Ascii(b)) => Some(b.to_ascii_lowercase()),
            _ => None,
        };
        match (lower(pos + 1), lower(pos + 2)) {
            (Some(b's' | b't' | b'm' | b'd'), _) => return Some(2),
            (Some(b'r'), Some(b'e')) | (Some(b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => {
                return Some(3)
            }
            _ => {}
        }
    }
    let c = t[pos];
    let letters_from = |i: usize| run_length(t, i, Collapsed::is_letter);
    if !c.is_newline()
        && !c.is_letter()
        && !c.is_number()
        && at(pos + 1).is_some_and(Collapsed::is_letter)
    {
        return Some(1 + letters_from(pos + 1));
    }
    if c.is_letter() {
        return Some(letters_from(pos));
    }
    if c.is_number() {
        return Some(1);
    }
    let is_other = |c: Collapsed| !(c.is_space() || c.is_letter() || c.is_number());
    let other_start = if c == Collapsed::Ascii(b' ') && at(pos + 1).is_some_and(is_other) {
        Some(pos + 1)
    } else if is_other(c) {
        Some(pos)
    } else {
        None
    };
    if let Some(start) = other_start {
        let end = start + run_length(t, start, is_other);
        return Some(end + run_length(t, end, Collapsed::is_newline) - pos);
    }
    let spaces = run_length(t, pos, Collapsed::is_space);
    if spaces == 0 {
        return None;
    }
    if let Some(i) = t[pos..pos + spaces].iter().rposition(|c| c.is_newline()) {
        return Some(i + 1);
    }
    if pos + spaces == t.len() || spaces == 1 {
        Some(spaces)
    } else {
        Some(spaces - 1)
    }
}
