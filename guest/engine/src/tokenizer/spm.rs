//! SentencePiece-style merging (`tokenizer.ggml.model = llama`), as llama.cpp's
//! `llm_tokenizer_spm_session`: start from single characters and repeatedly
//! merge the adjacent pair whose concatenation is a vocabulary token with the
//! highest score (leftmost on ties).

use alloc::collections::BinaryHeap;
use alloc::vec::Vec;
use core::cmp::Ordering;

use super::symbols::Symbol;

/// A candidate merge: the highest score pops first, then the leftmost.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// Merges `text` (spaces already escaped to U+2581) and leaves the surviving
/// symbols in `symbols`, in order. A merged symbol is always a token; a
/// single character may not be (the caller falls back to bytes).
pub fn merge(text: &str, token_score: impl Fn(&str) -> Option<f32>, symbols: &mut Vec<Symbol>) {
    symbols.clear();
    Symbol::split_chars(text, symbols);
    let mut queue = BinaryHeap::with_capacity(symbols.len());
    let push = |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: isize, right: isize| {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (&symbols[left as usize], &symbols[right as usize]);
        let size = l.len + r.len;
        if let Some(score) = token_score(&text[l.start..l.start + size]) {
            queue.push(Bigram {
                score,
                left: left as usize,
                right: right as usize,
                size,
            });
        }
    };
    for i in 1..symbols.len() {
        push(&mut queue, symbols, i as isize - 1, i as isize);
    }
    while let Some(bigram) = queue.pop() {
        let (left, right) = (bigram.left, bigram.right);
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
