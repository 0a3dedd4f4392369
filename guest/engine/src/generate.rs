//! The generation loop shared by every home of the engine (host command,
//! inference kernel): feed the prompt, then sample, stream and feed back one
//! token at a time until a stop condition.
//!
//! The engine has no clock: callers timestamp the events they receive.

use alloc::string::String;
use alloc::vec::Vec;

use crate::model::{Model, ModelError, Session};
use crate::parallel::Parallel;
use crate::sampling::{Sampler, SamplerConfig};
use crate::tokenizer::StreamDecoder;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token (EOS, `<end_of_turn>`, ...).
    EndOfGeneration,
    MaxTokens,
    /// The session's context is full.
    ContextFull,
    /// The observer asked to stop (client gone, cancel request).
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::EndOfGeneration => "stop",
            StopReason::MaxTokens => "length",
            StopReason::ContextFull => "context_full",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// What happens while generating.
pub enum Event<'e> {
    /// The prompt was fed; the first token is about to be sampled.
    /// `n_fed` tokens were processed, `n_reused` came from the cache.
    PromptProcessed { n_fed: usize, n_reused: usize },
    /// A generated token and the text it completes (may be empty while a
    /// multi-byte character is still partial).
    Token { id: u32, text: &'e str },
    /// Text held back at the end (an incomplete UTF-8 sequence, flushed as is).
    Tail { text: &'e str },
}

/// Whether to go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

#[derive(Debug, Clone)]
pub struct Request<'r> {
    /// The whole context to generate after (a chat: the whole conversation so
    /// far). The session reuses the longest prefix it already holds.
    pub prompt: &'r [u32],
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    /// Stop at end-of-generation tokens (off only for benchmarks that need N tokens).
    pub stop_at_eog: bool,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
}

pub fn generate(
    model: &Model<'_>,
    session: &mut Session,
    par: &dyn Parallel,
    req: &Request<'_>,
    on_event: &mut dyn FnMut(Event<'_>) -> Flow,
) -> Result<Outcome, ModelError> {
    let mut sampler = Sampler::new(req.sampling, model.config.n_vocab);
    for &t in req.prompt {
        sampler.accept(t);
    }
    let mut out = Outcome {
        tokens: Vec::new(),
        text: String::new(),
        stop: StopReason::MaxTokens,
    };
    let n_reused = session.reusable_prefix(req.prompt);
    session.feed_context(model, req.prompt, par)?;
    let n_fed = req.prompt.len() - n_reused;
    if on_event(Event::PromptProcessed { n_fed, n_reused }) == Flow::Stop {
        out.stop = StopReason::Cancelled;
        return Ok(out);
    }
    let mut decoder = StreamDecoder::new();
    while out.tokens.len() < req.max_tokens {
        let id = sampler.sample(session.logits());
        sampler.accept(id);
        out.tokens.push(id);
        let eog = model.tokenizer.is_end_of_generation(id);
        let text = if eog && req.stop_at_eog {
            String::new()
        } else {
            decoder.push(&model.tokenizer, id)
        };
        out.text.push_str(&text);
        if on_event(Event::Token { id, text: &text }) == Flow::Stop {
            out.stop = StopReason::Cancelled;
            return Ok(out);
        }
        if eog && req.stop_at_eog {
            out.stop = StopReason::EndOfGeneration;
            return Ok(out);
        }
        if out.tokens.len() == req.max_tokens {
            break;
        }
        if session.pos() + 1 > session.limits().n_ctx {
            out.stop = StopReason::ContextFull;
            break;
        }
        session.forward(model, &[id], par)?;
    }
    let rest = decoder.finish();
    if !rest.is_empty() {
        out.text.push_str(&rest);
        on_event(Event::Tail { text: &rest });
    }
    Ok(out)
}
