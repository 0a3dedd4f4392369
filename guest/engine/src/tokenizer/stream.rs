//! Streaming detokenization: token ids in, complete UTF-8 text out.

use alloc::string::String;
use alloc::vec::Vec;

use super::Tokenizer;

/// Turns generated tokens into text one at a time, holding back the bytes of
/// a character that is still incomplete (byte-fallback tokens can split an
/// emoji across several ids). Like llama.cpp's streaming (`common_token_to_piece`),
/// it strips no leading space and, unless asked, renders control tokens as nothing.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    render_special: bool,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that also shows control tokens (`<end_of_turn>`, ...) as their text.
    pub fn rendering_special() -> Self {
        StreamDecoder {
            pending: Vec::new(),
            render_special: true,
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer<'_>, id: u32) -> String {
        self.push_bytes(tokenizer.token_bytes(id, self.render_special))
    }

    /// Adds raw bytes; returns the text they complete. Bytes that can never
    /// start or continue a valid character come out as U+FFFD.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match core::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // The first valid_up_to() bytes are valid UTF-8: this never falls back.
                    out.push_str(core::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drained = self.pending.len() - keep;
        self.pending.drain(..drained);
        out
    }

    /// Whether bytes of an incomplete character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: whatever is held back comes out as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
