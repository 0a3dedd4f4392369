//! Splitting text around special tokens before tokenizing the rest, as
//! llama.cpp's `tokenizer_st_partition` does.
//!
//! llama.cpp takes the special tokens longest first and, for each, cuts every
//! still-raw piece of text at the token's leftmost non-overlapping
//! occurrences. This does the same, but only for the tokens that occur in the
//! text at all (found by walking a byte trie from each position), so the cost
//! does not grow with the thousands of special tokens a vocabulary may have;
//! a token seen only a few times is placed by looking up the gap around each
//! of its known occurrences instead of searching every gap.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Range;

use hashbrown::HashMap;

/// A piece of the input: raw text to tokenize, or a special token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

#[derive(Clone, Copy)]
struct Terminal {
    id: u32,
    /// Control and unknown tokens split the text only when parsing specials;
    /// user-defined tokens always do.
    needs_parse_special: bool,
}

struct Node {
    children: Vec<(u8, u32)>,
    terminal: Option<Terminal>,
}

/// A byte trie over the texts of the special tokens.
pub struct SpecialTokens {
    nodes: Vec<Node>,
    /// The root's children, indexed by byte (0: none).
    root: [u32; 256],
}

impl SpecialTokens {
    /// `tokens`: (id, text, needs_parse_special). Empty texts are skipped; a
    /// text listed twice keeps its first id.
    pub fn new<'t>(tokens: impl Iterator<Item = (u32, &'t str, bool)>) -> Self {
        let mut trie = SpecialTokens {
            nodes: alloc::vec![Node {
                children: Vec::new(),
                terminal: None
            }],
            root: [0; 256],
        };
        for (id, text, needs_parse_special) in tokens {
            if text.is_empty() {
                continue;
            }
            let mut node = 0usize;
            for &b in text.as_bytes() {
                node = trie.child_or_insert(node, b);
            }
            trie.nodes[node].terminal.get_or_insert(Terminal {
                id,
                needs_parse_special,
            });
        }
        trie
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    fn child(&self, node: usize, b: u8) -> Option<usize> {
        if node == 0 {
            let c = self.root[usize::from(b)];
            return (c != 0).then_some(c as usize);
        }
        self.nodes[node]
            .children
            .iter()
            .find(|&&(k, _)| k == b)
            .map(|&(_, c)| c as usize)
    }

    fn child_or_insert(&mut self, node: usize, b: u8) -> usize {
        if let Some(c) = self.child(node, b) {
            return c;
        }
        let c = self.nodes.len();
        self.nodes.push(Node {
            children: Vec::new(),
            terminal: None,
        });
        if node == 0 {
            self.root[usize::from(b)] = c as u32;
        } else {
            self.nodes[node].children.push((b, c as u32));
        }
        c
    }

    /// Splits `text` into raw pieces and special tokens.
    pub fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        // Raw stretches still to cut: start -> end.
        let mut gaps: BTreeMap<usize, usize> = BTreeMap::new();
        gaps.insert(0, text.len());
        let mut accepted: Vec<(usize, usize, u32)> = Vec::new();
        for token in self.tokens_present(text, parse_special) {
            let len = token.len;
            if token.count <= token.starts.len() {
                // Few occurrences, all known: take each that still lies inside a gap.
                for &start in &token.starts[..token.count] {
                    let Some((&gap_start, &gap_end)) = gaps.range(..=start).next_back() else {
                        continue;
                    };
                    if start + len > gap_end {
                        continue;
                    }
                    gaps.remove(&gap_start);
                    if start > gap_start {
                        gaps.insert(gap_start, start);
                    }
                    if start + len < gap_end {
                        gaps.insert(start + len, gap_end);
                    }
                    accepted.push((start, start + len, token.id));
                }
            } else {
                // Many occurrences: search every gap, leftmost first.
                let needle = &text[token.starts[0]..token.starts[0] + len];
                let mut next_gaps = BTreeMap::new();
                for (gap_start, gap_end) in gaps {
                    let mut from = gap_start;
                    while let Some(i) = text[from..gap_end].find(needle) {
                        let start = from + i;
                        if start > from {
                            next_gaps.insert(from, start);
                        }
                        accepted.push((start, start + len, token.id));
                        from = start + len;
                    }
                    if from < gap_end {
                        next_gaps.insert(from, gap_end);
                    }
                }
                gaps = next_gaps;
            }
        }
        accepted.sort_unstable();
        let mut fragments = Vec::with_capacity(2 * accepted.len() + 1);
        let mut pos = 0;
        for (start, end, id) in accepted {
            if start > pos {
                fragments.push(Fragment::Text(pos..start));
            }
            fragments.push(Fragment::Token(id));
            pos = end;
        }
        if pos < text.len() {
            fragments.push(Fragment::Text(pos..text.len()));
        }
        fragments
    }

    /// The special tokens occurring in `text`, in llama.cpp's order: longest
    /// first, then lowest id.
    fn tokens_present(&self, text: &str, parse_special: bool) -> Vec<Present> {
        let mut present: Vec<Present> = Vec::new();
        if self.is_empty() {
            return present;
        }
        let mut index: HashMap<u32, usize> = HashMap::new();
        let bytes = text.as_bytes();
        for start in 0..bytes.len() {
            let mut node = 0;
            for (i, &b) in bytes[start..].iter().enumerate() {
                match self.child(node, b) {
                    Some(c) => node = c,
                    None => break,
                }
                let Some(t) = self.nodes[node].terminal else {
                    continue;
                };
                if !parse_special && t.needs_parse_special {
                    continue;
                }
                let slot = *index.entry(t.id).or_insert_with(|| {
                    present.push(Present {
                        len: i + 1,
                        id: t.id,
                        count: 0,
                        starts: [0; KNOWN_STARTS],
                    });
                    present.len() - 1
                });
                let p = &mut present[slot];
                if p.count < KNOWN_STARTS {
                    p.starts[p.count] = start;
                }
                p.count += 1;
            }
        }
        present.sort_unstable_by(|a, b| b.len.cmp(&a.len).then(a.id.cmp(&b.id)));
        present
    }
}

/// How many occurrence positions are kept per token; tokens occurring more
/// often are found again by searching the text.
const KNOWN_STARTS: usize = 8;

/// A special token found in the text.
struct Present {
    /// Byte length of the token's text.
    len: usize,
    id: u32,
    /// Occurrences (overlapping ones included).
    count: usize,
    /// The first occurrences, ascending.
    starts: [usize; KNOWN_STARTS],
}
