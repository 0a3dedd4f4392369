//! The doubly linked list of text pieces both merge loops work on.

use alloc::vec::Vec;

/// A byte range of the text being merged, linked to its neighbours (-1: none).
#[derive(Debug, Clone, Copy)]
pub struct Symbol {
    pub start: usize,
    /// 0 once merged into its left neighbour.
    pub len: usize,
    pub prev: isize,
    pub next: isize,
}

impl Symbol {
    pub fn text<'t>(&self, text: &'t str) -> &'t str {
        &text[self.start..self.start + self.len]
    }

    /// One symbol per character of `text`.
    pub fn split_chars(text: &str, out: &mut Vec<Symbol>) {
        let count = text.chars().count();
        out.reserve(count);
        for (i, (start, c)) in text.char_indices().enumerate() {
            out.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i as isize - 1,
                next: if i + 1 == count { -1 } else { i as isize + 1 },
            });
        }
    }

    /// Merges `right` into `left` (its neighbour) and unlinks it.
    pub fn merge(symbols: &mut [Symbol], left: usize, right: usize) {
        symbols[left].len += symbols[right].len;
        symbols[right].len = 0;
        let next = symbols[right].next;
        symbols[left].next = next;
        if next >= 0 {
            symbols[next as usize].prev = left as isize;
        }
    }
}
