//! Unit tests with small hand-built vocabularies. Expected ids follow
//! llama.cpp's algorithms as worked out by hand in each test.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::pretokenize::PreTokenizer;
use super::special::Fragment;
use super::*;

const U: TokenType = TokenType::Unknown;
const C: TokenType = TokenType::Control;
const N: TokenType = TokenType::Normal;
const D: TokenType = TokenType::UserDefined;

/// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, then (optionally) the
/// 256 byte tokens, then `extra` as (text, score, type).
struct SpmVocab {
    texts: Vec<String>,
    scores: Vec<f32>,
    types: Vec<TokenType>,
}

impl SpmVocab {
    fn new(byte_tokens: bool, extra: &[(&str, f32, TokenType)]) -> Self {
        let mut v = SpmVocab {
            texts: vec![],
            scores: vec![],
            types: vec![],
        };
        v.push("<unk>", 0.0, U);
        v.push("<s>", 0.0, C);
        v.push("</s>", 0.0, C);
        if byte_tokens {
            for b in 0..=255u8 {
                v.texts.push(alloc::format!("<0x{b:02X}>"));
                v.scores.push(0.0);
                v.types.push(TokenType::Byte);
            }
        }
        for &(t, s, ty) in extra {
            v.push(t, s, ty);
        }
        v
    }

    fn push(&mut self, t: &str, s: f32, ty: TokenType) {
        self.texts.push(String::from(t));
        self.scores.push(s);
        self.types.push(ty);
    }

    fn spec(&self, add_space_prefix: bool) -> VocabSpec<'_> {
        let tokens = self.texts.iter().map(|s| s.as_str()).collect();
        let mut spec = VocabSpec::with_defaults("llama", None, tokens).unwrap();
        spec.scores = self.scores.clone();
        spec.token_types = self.types.clone();
        spec.add_space_prefix = add_space_prefix;
        spec
    }

    fn tokenizer(&self, add_space_prefix: bool) -> Tokenizer<'_> {
        Tokenizer::new(self.spec(add_space_prefix)).unwrap()
    }
}

/// Token ids -> texts, for readable assertions.
fn texts<'a>(t: &Tokenizer<'a>, ids: &[u32]) -> Vec<&'a str> {
    ids.iter().map(|&id| t.token_text(id)).collect()
}

const BYTE_TOKEN_0: u32 = 3;

fn byte_id(b: u8) -> u32 {
    BYTE_TOKEN_0 + u32::from(b)
}

#[test]
fn spm_merges_highest_score_first() {
    let v = SpmVocab::new(
        true,
        &[
            ("a", -10.0, N),
            ("b", -10.0, N),
            ("c", -10.0, N),
            ("ab", -5.0, N),
            ("bc", -2.0, N),
        ],
    );
    let t = v.tokenizer(false);
    // "bc" scores higher than "ab", so "abc" becomes a + bc.
    assert_eq!(texts(&t, &t.encode("abc", false, false)), ["a", "bc"]);

    let v = SpmVocab::new(
        true,
        &[
            ("a", -10.0, N),
            ("b", -10.0, N),
            ("c", -10.0, N),
            ("ab", -5.0, N),
            ("bc", -2.0, N),
            ("abc", -1.0, N),
        ],
    );
    let t = v.tokenizer(false);
    assert_eq!(texts(&t, &t.encode("abc", false, false)), ["abc"]);
    // A merge result need not be reachable from the best first merge:
    // "ab" + "c" would give "abc" too, but "bc" wins first and "a" + "bc" is "abc" as well.
    assert_eq!(texts(&t, &t.encode("abcab", false, false)), ["abc", "ab"]);
}

#[test]
fn spm_ties_merge_leftmost_first() {
    let v = SpmVocab::new(true, &[("a", -10.0, N), ("aa", -1.0, N)]);
    let t = v.tokenizer(false);
    assert_eq!(texts(&t, &t.encode("aaa", false, false)), ["aa", "a"]);
    assert_eq!(
        texts(&t, &t.encode("aaaaa", false, false)),
        ["aa", "aa", "a"]
    );
}

#[test]
fn spm_byte_fallback_for_characters_outside_the_vocabulary() {
    let v = SpmVocab::new(true, &[("a", -1.0, N)]);
    let t = v.tokenizer(false);
    // é is C3 A9; newline and the digit fall back to single bytes too.
    assert_eq!(
        t.encode("aé", false, false),
        [t.token_id("a").unwrap(), byte_id(0xC3), byte_id(0xA9)]
    );
    assert_eq!(
        t.encode("a\n7", false, false),
        [t.token_id("a").unwrap(), byte_id(b'\n'), byte_id(b'7')]
    );
    // An emoji is four byte tokens.
    assert_eq!(
        t.encode("🙂", false, false),
        [byte_id(0xF0), byte_id(0x9F), byte_id(0x99), byte_id(0x82)]
    );
}

#[test]
fn spm_unknown_characters_without_byte_tokens() {
    let v = SpmVocab::new(false, &[("a", -1.0, N)]);
    let t = v.tokenizer(false);
    assert_eq!(t.encode("aéa", false, false), [3, 0, 3]);
}

#[test]
fn spm_space_prefix_on_and_off() {
    let extra = [
        ("a", -5.0, N),
        ("b", -5.0, N),
        ("\u{2581}", -6.0, N),
        ("\u{2581}a", -1.0, N),
        ("\u{2581}b", -1.0, N),
    ];
    let v = SpmVocab::new(true, &extra);
    let on = v.tokenizer(true);
    assert_eq!(texts(&on, &on.encode("a b", false, false)), ["▁a", "▁b"]);
    let off = v.tokenizer(false);
    assert_eq!(texts(&off, &off.encode("a b", false, false)), ["a", "▁b"]);
    // With the prefix, a leading space doubles up: "▁▁a".
    assert_eq!(texts(&on, &on.encode(" a", false, false)), ["▁", "▁a"]);
}

#[test]
fn spm_runs_of_spaces_and_newlines() {
    let extra = [
        ("a", -5.0, N),
        ("b", -5.0, N),
        ("\u{2581}", -6.0, N),
        ("\u{2581}\u{2581}", -2.0, N),
        ("\u{2581}b", -1.0, N),
    ];
    let v = SpmVocab::new(true, &extra);
    let t = v.tokenizer(false);
    // "a▁▁▁b": ▁b (-1) beats ▁▁ (-2), then the first two spaces pair up.
    assert_eq!(
        texts(&t, &t.encode("a   b", false, false)),
        ["a", "▁▁", "▁b"]
    );
    assert_eq!(
        texts(&t, &t.encode("a\n\nb", false, false)),
        ["a", "<0x0A>", "<0x0A>", "b"]
    );
}

#[test]
fn spm_digits_and_cjk() {
    let extra = [
        ("1", -1.0, N),
        ("2", -1.0, N),
        ("12", -9.0, N),
        ("你", -1.0, N),
        ("你好", -0.5, N),
    ];
    let v = SpmVocab::new(true, &extra);
    let t = v.tokenizer(false);
    assert_eq!(texts(&t, &t.encode("212", false, false)), ["2", "12"]);
    assert_eq!(texts(&t, &t.encode("你好你", false, false)), ["你好", "你"]);
    // 世 = E4 B8 96 is not in the vocabulary.
    assert_eq!(
        texts(&t, &t.encode("你世", false, false)),
        ["你", "<0xE4>", "<0xB8>", "<0x96>"]
    );
}

#[test]
fn bos_and_eos_follow_add_special_and_the_flags() {
    let v = SpmVocab::new(true, &[("\u{2581}a", -1.0, N)]);
    let mut spec = v.spec(true);
    spec.add_eos = true;
    let t = Tokenizer::new(spec).unwrap();
    assert_eq!(
        t.encode("a", true, false),
        [1, t.token_id("▁a").unwrap(), 2]
    );
    assert_eq!(t.encode("a", false, false), [t.token_id("▁a").unwrap()]);
    assert_eq!(t.encode("", true, false), [1, 2]);
    assert_eq!(t.encode("", false, false), Vec::<u32>::new());

    let mut spec = v.spec(true);
    spec.add_bos = false;
    let t = Tokenizer::new(spec).unwrap();
    assert_eq!(t.encode("a", true, false), [t.token_id("▁a").unwrap()]);

    let mut spec = v.spec(true);
    spec.special.bos = None;
    assert_eq!(
        Tokenizer::new(spec).unwrap_err(),
        TokenizerError::MissingSpecialToken {
            flag: "add_bos",
            which: "BOS"
        }
    );
}

#[test]
fn special_tokens_inside_text() {
    let extra = [
        ("<ctl>", 0.0, C),
        ("<u>", 0.0, D),
        ("x", -1.0, N),
        ("\u{2581}x", -0.5, N),
        ("<", -1.0, N),
        (">", -1.0, N),
        ("c", -1.0, N),
        ("t", -1.0, N),
        ("l", -1.0, N),
    ];
    let v = SpmVocab::new(true, &extra);
    let t = v.tokenizer(false);
    let ctl = t.token_id("<ctl>").unwrap();
    let u = t.token_id("<u>").unwrap();
    let x = t.token_id("x").unwrap();
    // Control tokens need parse_special; user-defined ones always split.
    assert_eq!(t.encode("x<ctl>x", false, true), [x, ctl, x]);
    assert_eq!(
        texts(&t, &t.encode("x<ctl>x", false, false)),
        ["x", "<", "c", "t", "l", ">", "x"]
    );
    assert_eq!(t.encode("x<u>x", false, false), [x, u, x]);
    // BOS written in the text is a control token too.
    assert_eq!(t.encode("<s>x", true, true), [1, 1, x]);

    // The space prefix comes back after every special token.
    let t = v.tokenizer(true);
    let sx = t.token_id("▁x").unwrap();
    assert_eq!(t.encode("x<ctl>x", false, true), [sx, ctl, sx]);
    assert_eq!(t.encode("x<u>x", false, false), [sx, u, sx]);
}

#[test]
fn special_partition_takes_longest_tokens_first() {
    let tokens = ["<unk>", "xy", "yzw", "ab", "abc"];
    let mut spec = VocabSpec::with_defaults("llama", None, tokens.to_vec()).unwrap();
    spec.token_types = vec![U, C, C, C, C];
    spec.add_bos = false;
    let t = Tokenizer::new(spec).unwrap();
    // "yzw" (longer) is cut out first, so the earlier "xy" overlapping it is text.
    assert_eq!(
        t.special_tokens.partition("xyzw", true),
        [Fragment::Text(0..1), Fragment::Token(2)]
    );
    assert_eq!(
        t.special_tokens.partition("abcab", true),
        [Fragment::Token(4), Fragment::Token(3)]
    );
    assert_eq!(
        t.special_tokens.partition("-ab-xy", true),
        [
            Fragment::Text(0..1),
            Fragment::Token(3),
            Fragment::Text(3..4),
            Fragment::Token(1)
        ]
    );
    assert_eq!(
        t.special_tokens.partition("-ab-xy", false),
        [Fragment::Text(0..6)]
    );
    // Overlapping occurrences of one token: leftmost first.
    assert_eq!(
        t.special_tokens.partition("ababa", true),
        [Fragment::Token(3), Fragment::Token(3), Fragment::Text(4..5)]
    );
    // More occurrences than the partition remembers positions of.
    let many = "xy-".repeat(20);
    let fragments = t.special_tokens.partition(&many, true);
    assert_eq!(fragments.len(), 40);
    assert!(fragments
        .chunks(2)
        .enumerate()
        .all(|(i, pair)| pair == [Fragment::Token(1), Fragment::Text(3 * i + 2..3 * i + 3)]));
    assert_eq!(t.special_tokens.partition("", true), []);
}

#[test]
fn end_of_generation_tokens() {
    let tokens = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<end_of_turn>",
        "<|im_end|>",
        "hello",
    ];
    let mut spec = VocabSpec::with_defaults("llama", None, tokens.to_vec()).unwrap();
    spec.token_types = vec![C, C, C, C, N, N];
    spec.special.eos = Some(1);
    spec.special.bos = Some(2);
    let t = Tokenizer::new(spec).unwrap();
    assert!(t.is_end_of_generation(1));
    assert!(t.is_end_of_generation(3));
    // Recognised by its text, and promoted to a control token.
    assert!(t.is_end_of_generation(4));
    assert!(t.is_control(4));
    assert!(!t.is_end_of_generation(2));
    assert!(!t.is_end_of_generation(5));
    assert_eq!(t.special_ids().eot, Some(3));
    assert_eq!(t.end_of_generation_tokens(), [1, 3, 4]);
}

#[test]
fn spm_token_bytes() {
    let extra = [
        ("hi", -2.0, N),
        ("\u{2581}hi", -1.0, N),
        ("<u>", 0.0, D),
        ("a\u{2581}\u{2581}b", -1.0, N),
    ];
    let v = SpmVocab::new(true, &extra);
    let t = v.tokenizer(true);
    assert_eq!(t.token_bytes(t.token_id("▁hi").unwrap(), false), b" hi");
    assert_eq!(t.token_bytes(t.token_id("a▁▁b").unwrap(), false), b"a  b");
    assert_eq!(t.token_bytes(byte_id(0xE9), false), [0xE9]);
    assert_eq!(t.token_bytes(t.token_id("<u>").unwrap(), false), b"<u>");
    // Control tokens show only when asked.
    assert_eq!(t.token_bytes(2, false), b"");
    assert_eq!(t.token_bytes(2, true), b"</s>");
    assert_eq!(t.token_bytes(99_999, true), b"");
    // llama_detokenize drops the space the prefix added.
    let ids = t.encode("hi hi", false, false);
    assert_eq!(t.decode(&ids, false), "hi hi");
}

#[test]
fn stream_decoder_holds_back_split_characters() {
    let v = SpmVocab::new(true, &[("ok", -2.0, N), ("\u{2581}ok", -1.0, N)]);
    let t = v.tokenizer(true);
    let mut d = StreamDecoder::new();
    let ok = t.token_id("▁ok").unwrap();
    assert_eq!(d.push(&t, ok), " ok");
    // 🙂 = F0 9F 99 82, one byte token at a time.
    assert_eq!(d.push(&t, byte_id(0xF0)), "");
    assert_eq!(d.push(&t, byte_id(0x9F)), "");
    assert_eq!(d.push(&t, byte_id(0x99)), "");
    assert!(d.has_pending());
    assert_eq!(d.push(&t, byte_id(0x82)), "🙂");
    // é = C3 A9 split, then text.
    assert_eq!(d.push(&t, byte_id(0xC3)), "");
    assert_eq!(d.push(&t, byte_id(0xA9)), "é");
    // Control tokens are silent.
    assert_eq!(d.push(&t, 2), "");
    // A byte that can't start a character comes out as U+FFFD at once.
    assert_eq!(d.push(&t, byte_id(0x80)), "\u{fffd}");
    // An unfinished character at the end is flushed as U+FFFD.
    assert_eq!(d.push(&t, byte_id(0xE4)), "");
    assert_eq!(d.finish(), "\u{fffd}");
    assert!(!d.has_pending());
    // Rendering specials on request.
    let mut d = StreamDecoder::rendering_special();
    assert_eq!(d.push(&t, 2), "</s>");
}

/// The words a pre-tokenizer makes of `text`.
fn split(pre: PreTokenizer, text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut start = 0;
    pre.split(&chars)
        .into_iter()
        .map(|len| {
            let word: String = chars[start..start + len].iter().collect();
            start += len;
            word
        })
        .collect()
}

#[test]
fn gpt2_pre_tokenizer_splits() {
    let p = PreTokenizer::Gpt2;
    assert_eq!(
        split(p, "Hello world! It's 2024..."),
        ["Hello", " world", "!", " It", "'s", " 2024", "..."]
    );
    // \s+(?!\S): a run of spaces leaves its last one to the next word.
    assert_eq!(split(p, "a   b"), ["a", "  ", " b"]);
    assert_eq!(split(p, "a  "), ["a", "  "]);
    assert_eq!(split(p, "\n\nHi"), ["\n", "\n", "Hi"]);
    // Contractions are case-sensitive here.
    assert_eq!(split(p, "I'M"), ["I", "'", "M"]);
    assert_eq!(split(p, "naïve café 你好"), ["naïve", " café", " 你好"]);
    assert_eq!(split(p, "🙂🙂 x"), ["🙂🙂", " x"]);
}

#[test]
fn llama3_pre_tokenizer_splits() {
    let p = PreTokenizer::Llama3;
    assert_eq!(
        split(p, "Hello world! It's 2024..."),
        ["Hello", " world", "!", " It", "'s", " ", "202", "4", "..."]
    );
    assert_eq!(split(p, "I'M"), ["I", "'M"]);
    assert_eq!(split(p, "\n\nHi"), ["\n\n", "Hi"]);
    assert_eq!(split(p, "a  \n b"), ["a", "  \n", " b"]);
    assert_eq!(split(p, "(hello) x"), ["(hello", ")", " x"]);
    assert_eq!(split(p, "1234567"), ["123", "456", "7"]);
    assert_eq!(split(p, "ok!!\n\nnext"), ["ok", "!!\n\n", "next"]);
    assert_eq!(split(p, "你好 世界"), ["你好", " 世界"]);
}

#[test]
fn qwen2_pre_tokenizer_splits() {
    let p = PreTokenizer::Qwen2;
    assert_eq!(
        split(p, "abc 12345 ok"),
        ["abc", " ", "1", "2", "3", "4", "5", " ok"]
    );
    assert_eq!(split(p, "Hi!!\n\n"), ["Hi", "!!\n\n"]);
    assert_eq!(split(p, "I'M here"), ["I", "'M", " here"]);
    assert_eq!(split(p, "a   b"), ["a", "  ", " b"]);
    assert_eq!(split(p, "x \n\n y"), ["x", " \n\n", " y"]);
}

#[test]
fn starcoder_and_default_pre_tokenizer_splits() {
    assert_eq!(
        split(PreTokenizer::StarCoder, "ab 123"),
        ["ab", " ", "1", "2", "3"]
    );
    assert_eq!(
        split(PreTokenizer::Default, "Hello, world 12345!"),
        ["Hello", ",", " world", " ", "123", "45", "!"]
    );
}

#[test]
fn gpt2_byte_mapping() {
    assert_eq!(bpe::byte_to_char(b' '), 'Ġ');
    assert_eq!(bpe::byte_to_char(b'\n'), 'Ċ');
    assert_eq!(bpe::byte_to_char(b'a'), 'a');
    assert_eq!(bpe::byte_to_char(0xAD), '\u{143}');
    for b in 0..=255u8 {
        assert_eq!(bpe::char_to_byte(bpe::byte_to_char(b)), Some(b));
    }
    let mut s = String::new();
    bpe::encode_bytes("é ", &mut s);
    assert_eq!(s, "Ã©Ġ");
}

/// A byte-level BPE vocabulary: the 256 byte characters, then `extra`.
fn bpe_tokenizer<'a>(tokens: &'a [String], merges: &[&'a str], pre: &str) -> Tokenizer<'a> {
    let mut spec = VocabSpec::with_defaults(
        "gpt2",
        Some(pre),
        tokens.iter().map(|s| s.as_str()).collect(),
    )
    .unwrap();
    spec.merges = merges.to_vec();
    spec.add_bos = false;
    spec.special.bos = None;
    spec.special.eos = None;
    Tokenizer::new(spec).unwrap()
}

fn byte_vocab(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = (0..=255u8)
        .map(|b| String::from(bpe::byte_to_char(b)))
        .collect();
    v.extend(extra.iter().map(|s| String::from(*s)));
    v
}

#[test]
fn bpe_merges_by_rank() {
    let tokens = byte_vocab(&["ab", "bc", "abc", "bcd"]);
    // "b c" ranks first, then "a bc"; "a b" ranks after both.
    let t = bpe_tokenizer(&tokens, &["b c", "a bc", "a b", "bc d"], "gpt-2");
    assert_eq!(texts(&t, &t.encode("abcd", false, false)), ["abc", "d"]);
    let t = bpe_tokenizer(&tokens, &["a b", "b c", "a bc", "bc d"], "gpt-2");
    // "a b" first: ab + c + d, and no merge joins them.
    assert_eq!(texts(&t, &t.encode("abcd", false, false)), ["ab", "c", "d"]);
    // Leftmost on equal ranks: "aaa" with "a a" gives aa + a.
    let tokens = byte_vocab(&["aa"]);
    let t = bpe_tokenizer(&tokens, &["a a"], "gpt-2");
    assert_eq!(texts(&t, &t.encode("aaa", false, false)), ["aa", "a"]);
}

#[test]
fn bpe_words_and_spaces() {
    let tokens = byte_vocab(&[
        "Ġw", "Ġwo", "Ġwor", "ld", "Ġworld", "he", "hel", "hell", "hello",
    ]);
    let merges = [
        "Ġ w", "Ġw o", "Ġwo r", "l d", "Ġwor ld", "h e", "he l", "hel l", "hell o",
    ];
    let t = bpe_tokenizer(&tokens, &merges, "gpt-2");
    let ids = t.encode("hello world", false, false);
    assert_eq!(texts(&t, &ids), ["hello", "Ġworld"]);
    assert_eq!(t.decode(&ids, false), "hello world");
    assert_eq!(
        t.token_bytes(t.token_id("Ġworld").unwrap(), false),
        b" world"
    );
    // é is two bytes, each its own byte character.
    assert_eq!(texts(&t, &t.encode("é", false, false)), ["Ã", "©"]);
}

#[test]
fn bpe_ignore_merges_takes_whole_word_tokens() {
    let tokens = byte_vocab(&["Ġhello"]);
    let t = bpe_tokenizer(&tokens, &[], "llama-bpe");
    assert_eq!(texts(&t, &t.encode(" hello", false, false)), ["Ġhello"]);
    let t = bpe_tokenizer(&tokens, &[], "gpt-2");
    assert_eq!(t.encode(" hello", false, false).len(), 6);
}

#[test]
fn bpe_decode_cleans_spaces_like_llama_cpp() {
    let mut v = Vec::new();
    clean_spaces_str(&mut v, "Hi , there ! It 's a ' quoted ' word .");
    assert_eq!(
        String::from_utf8(v).unwrap(),
        "Hi, there! It's a'quoted'word."
    );
}

fn clean_spaces_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    super::clean_spaces(out);
}

#[test]
fn unknown_pre_tokenizer_is_an_error() {
    let tokens = byte_vocab(&[]);
    let err = VocabSpec::with_defaults(
        "gpt2",
        Some("made-up"),
        tokens.iter().map(|s| s.as_str()).collect(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        TokenizerError::UnsupportedPreTokenizer(String::from("made-up"))
    );
    assert_eq!(
        VocabSpec::with_defaults("bert", None, vec!["a"]).unwrap_err(),
        TokenizerError::UnsupportedModel(String::from("bert"))
    );
}

#[test]
fn duplicate_tokens_are_rejected() {
    let spec =
        VocabSpec::with_defaults("llama", None, vec!["<unk>", "<s>", "</s>", "a", "a"]).unwrap();
    assert_eq!(
        Tokenizer::new(spec).unwrap_err(),
        TokenizerError::DuplicateToken {
            text: String::from("a"),
            first: 3,
            second: 4
        }
    );
}

#[test]
fn long_inputs_encode_in_near_linear_time() {
    let v = SpmVocab::new(
        true,
        &[
            ("a", -3.0, N),
            ("aa", -2.0, N),
            ("aaaa", -1.0, N),
            ("\u{2581}", -4.0, N),
        ],
    );
    let t = v.tokenizer(false);
    let text: String = "aaaa ".repeat(50_000);
    let ids = t.encode(&text, false, false);
    assert_eq!(ids.len(), 100_000);
    let tokens = byte_vocab(&["aa", "aaaa"]);
    let t = bpe_tokenizer(&tokens, &["a a", "aa aa"], "llama-bpe");
    let text: String = "a".repeat(200_000);
    assert_eq!(t.encode(&text, false, false).len(), 50_000);

    // Thousands of distinct special tokens in one text.
    let names: Vec<String> = (0..5000).map(|i| alloc::format!("<u{i}>")).collect();
    let mut v = SpmVocab::new(true, &[]);
    for name in &names {
        v.push(name, 0.0, C);
    }
    let t = v.tokenizer(false);
    let text: String = names
        .iter()
        .flat_map(|n| [n.as_str(), "x"])
        .collect::<Vec<_>>()
        .concat()
        .repeat(2);
    let ids = t.encode(&text, false, true);
    assert_eq!(ids.len(), 20_000);
    assert_eq!(ids[0], t.token_id("<u0>").unwrap());
    assert_eq!(ids[1], byte_id(b'x'));
}

/// A GGUF file with just metadata, for `from_gguf`.
struct GgufWriter {
    kv: Vec<u8>,
    n: u64,
}

impl GgufWriter {
    fn new() -> Self {
        GgufWriter { kv: vec![], n: 0 }
    }
    fn key(&mut self, k: &str, ty: u32) {
        self.kv.extend_from_slice(&(k.len() as u64).to_le_bytes());
        self.kv.extend_from_slice(k.as_bytes());
        self.kv.extend_from_slice(&ty.to_le_bytes());
        self.n += 1;
    }
    fn string(&mut self, s: &str) {
        self.kv.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.kv.extend_from_slice(s.as_bytes());
    }
    fn str(mut self, k: &str, v: &str) -> Self {
        self.key(k, 8);
        self.string(v);
        self
    }
    fn u32(mut self, k: &str, v: u32) -> Self {
        self.key(k, 4);
        self.kv.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bool(mut self, k: &str, v: bool) -> Self {
        self.key(k, 7);
        self.kv.push(u8::from(v));
        self
    }
    fn array(mut self, k: &str, elem: u32, n: usize, body: impl FnOnce(&mut Self)) -> Self {
        self.key(k, 9);
        self.kv.extend_from_slice(&elem.to_le_bytes());
        self.kv.extend_from_slice(&(n as u64).to_le_bytes());
        body(&mut self);
        self
    }
    fn strs(self, k: &str, v: &[&str]) -> Self {
        self.array(k, 8, v.len(), |w| v.iter().for_each(|s| w.string(s)))
    }
    fn f32s(self, k: &str, v: &[f32]) -> Self {
        self.array(k, 6, v.len(), |w| {
            v.iter()
                .for_each(|x| w.kv.extend_from_slice(&x.to_le_bytes()))
        })
    }
    fn i32s(self, k: &str, v: &[i32]) -> Self {
        self.array(k, 5, v.len(), |w| {
            v.iter()
                .for_each(|x| w.kv.extend_from_slice(&x.to_le_bytes()))
        })
    }
    fn build(self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&self.n.to_le_bytes());
        out.extend_from_slice(&self.kv);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out
    }
}

#[test]
fn from_gguf_reads_a_sentencepiece_vocabulary() {
    let file = GgufWriter::new()
        .str("tokenizer.ggml.model", "llama")
        .strs(
            "tokenizer.ggml.tokens",
            &[
                "<pad>",
                "<eos>",
                "<bos>",
                "<unk>",
                "<start_of_turn>",
                "<end_of_turn>",
                "\u{2581}hi",
                "hi",
            ],
        )
        .f32s(
            "tokenizer.ggml.scores",
            &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0],
        )
        .i32s("tokenizer.ggml.token_type", &[3, 3, 3, 2, 3, 3, 1, 1])
        .u32("tokenizer.ggml.bos_token_id", 2)
        .u32("tokenizer.ggml.eos_token_id", 1)
        .u32("tokenizer.ggml.unknown_token_id", 3)
        .u32("tokenizer.ggml.padding_token_id", 0)
        .bool("tokenizer.ggml.add_space_prefix", false)
        .bool("tokenizer.ggml.add_bos_token", true)
        .build();
    let gguf = crate::gguf::Gguf::parse(&file).unwrap();
    let t = Tokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(t.n_vocab(), 8);
    assert_eq!((t.bos(), t.eos()), (Some(2), Some(1)));
    assert_eq!(t.encode("<start_of_turn>hi hi", true, true), [2, 4, 7, 6]);
    assert!(t.is_end_of_generation(5) && t.is_end_of_generation(1));
    assert_eq!(t.kind(), TokenizerKind::SentencePiece);
}

#[test]
fn from_gguf_reads_a_bpe_vocabulary_and_reports_missing_keys() {
    let tokens = byte_vocab(&["Ġh", "Ġhi", "<|eot_id|>", "<|begin_of_text|>"]);
    let token_refs: Vec<&str> = tokens.iter().map(|s| s.as_str()).collect();
    let types: Vec<i32> = (0..tokens.len())
        .map(|i| if i >= 258 { 3 } else { 1 })
        .collect();
    let file = GgufWriter::new()
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "llama-bpe")
        .strs("tokenizer.ggml.tokens", &token_refs)
        .i32s("tokenizer.ggml.token_type", &types)
        .strs("tokenizer.ggml.merges", &["Ġ h", "Ġh i"])
        .u32("tokenizer.ggml.bos_token_id", 259)
        .u32("tokenizer.ggml.eos_token_id", 258)
        .build();
    let gguf = crate::gguf::Gguf::parse(&file).unwrap();
    let t = Tokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(t.kind(), TokenizerKind::BytePairEncoding);
    assert_eq!(t.pre_tokenizer(), PreTokenizer::Llama3);
    // llama-bpe adds BOS by default.
    assert_eq!(
        t.encode("hi<|eot_id|>", true, true),
        [259, u32::from(b'h'), u32::from(b'i'), 258]
    );
    assert_eq!(texts(&t, &t.encode(" hi", false, false)), ["Ġhi"]);

    let file = GgufWriter::new()
        .str("tokenizer.ggml.model", "gpt2")
        .strs("tokenizer.ggml.tokens", &token_refs)
        .build();
    let gguf = crate::gguf::Gguf::parse(&file).unwrap();
    assert_eq!(
        Tokenizer::from_gguf(&gguf).unwrap_err(),
        TokenizerError::MissingKey {
            key: "tokenizer.ggml.merges"
        }
    );
    let file = GgufWriter::new()
        .str("tokenizer.ggml.model", "llama")
        .u32("tokenizer.ggml.tokens", 3)
        .build();
    let gguf = crate::gguf::Gguf::parse(&file).unwrap();
    assert_eq!(
        Tokenizer::from_gguf(&gguf).unwrap_err(),
        TokenizerError::WrongType {
            key: "tokenizer.ggml.tokens",
            expected: "an array of strings"
        }
    );
}
