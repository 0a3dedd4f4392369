//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): the GPT-2 byte-to-unicode
//! mapping and the merge loop (lowest merge rank first, leftmost on ties).

use alloc::collections::BinaryHeap;
use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Ordering;

use super::symbols::Symbol;

/// GPT-2's printable stand-in for every byte: printable Latin-1 bytes map to
/// themselves, the others to U+0100.. in byte order.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut next_extra = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let printable =
            (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
        let cp = if printable {
            b as u32
        } else {
            next_extra += 1;
            255 + next_extra
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    table
};

/// The inverse of [`BYTE_TO_CHAR`], indexed by code point (all are below U+0144).
const CHAR_TO_BYTE: [i16; 0x144] = {
    let mut table = [-1i16; 0x144];
    let mut b = 0usize;
    while b < 256 {
        table[BYTE_TO_CHAR[b] as usize] = b as i16;
        b += 1;
    }
    table
};

pub fn byte_to_char(b: u8) -> char {
    BYTE_TO_CHAR[usize::from(b)]
}

pub fn char_to_byte(c: char) -> Option<u8> {
    CHAR_TO_BYTE
        .get(c as usize)
        .and_then(|&b| u8::try_from(b).ok())
}

/// Appends the GPT-2 encoding of `text`'s UTF-8 bytes to `out`.
pub fn encode_bytes(text: &str, out: &mut String) {
    out.extend(text.bytes().map(byte_to_char));
}

/// Decodes a token's GPT-2 text to bytes, like llama.cpp's `llama_decode_text`
/// (including its odd marker for characters outside the mapping).
pub fn decode_text(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut utf8 = [0u8; 4];
                for &b in c.encode_utf8(&mut utf8).as_bytes() {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 15)]);
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
}

/// A candidate merge in the work queue: the lowest rank pops first, then the leftmost.
#[derive(PartialEq, Eq)]
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Runs the merges over one pre-tokenized, GPT-2 encoded word and returns the
/// surviving symbols (as byte ranges of `word`) in order.
pub fn merge_word(word: &str, rank: impl Fn(&str, &str) -> Option<u32>, symbols: &mut Vec<Symbol>) {
    symbols.clear();
    Symbol::split_chars(word, symbols);
    let mut queue = BinaryHeap::new();
    let push = |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: isize, right: isize| {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (&symbols[left as usize], &symbols[right as usize]);
        if let Some(rank) = rank(l.text(word), r.text(word)) {
            queue.push(Bigram {
                rank,
                left: left as usize,
                right: right as usize,
                size: l.len + r.len,
            });
        }
    };
    for i in 1..symbols.len() {
        push(&mut queue, symbols, i as isize - 1, i as isize);
    }
    while let Some(bigram) = queue.pop() {
        let (left, right) = (bigram.left, bigram.right);
        // Outdated: one side was merged since this pair was queued (symbols only
        // grow rightwards from fixed starts, so the total size tells).
        if symbols[left].len == 0
            || symbols[right].len == 0
            || symbols[left].len + symbols[right].len != bigram.size
        {
            continue;
        }
        Symbol::merge(symbols, left, right);
        let (prev, next) = (symbols[left].prev, symbols[left].next);
        push(&mut queue, symbols, prev, left as isize);
        push(&mut queue, symbols, left as isize, next);
    }
    symbols.retain(|s| s.len > 0);
}
