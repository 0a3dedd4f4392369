//! Running the engine directly on the host (`aivmm generate`): the reference
//! point for what a partition must match, in output and in speed.

use std::fs::File;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use aivmm_engine::chat::{ChatTemplate, Message, Role};
use aivmm_engine::generate::{generate, Event, Flow, Request};
use aivmm_engine::gguf::{Gguf, GgufError};
use aivmm_engine::host_pool::ThreadPool;
use aivmm_engine::model::{Model, ModelError, Session, SessionLimits};
use aivmm_engine::quant::Kernels;
use aivmm_engine::sampling::SamplerConfig;
use memmap2::Mmap;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum HostEngineError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot map model file {path} into memory: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable GGUF model: {source}")]
    Gguf { path: PathBuf, source: GgufError },
    #[error("cannot run model {path}: {source}")]
    Model { path: PathBuf, source: ModelError },
    #[error("generation failed: {0}")]
    Generate(#[source] ModelError),
    #[error("invalid sampling parameters: {0}")]
    Sampling(&'static str),
    #[error("cannot start {threads} engine threads: {source}")]
    Threads {
        threads: usize,
        source: std::io::Error,
    },
    #[error("context size {requested} is out of range (1..={max}, the model's training context)")]
    ContextSize { requested: usize, max: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("writing output: {0}")]
    Output(#[source] std::io::Error),
}

/// A GGUF file mapped read-only into this process.
pub struct MappedModel {
    pub path: PathBuf,
    map: Mmap,
}

impl MappedModel {
    pub fn open(path: &Path) -> Result<Self, HostEngineError> {
        let file = File::open(path).map_err(|source| HostEngineError::Open {
            path: path.into(),
            source,
        })?;
        // SAFETY: the mapping is read-only and private to this process; model files
        // are not modified while in use (a concurrent truncation would be a
        // SIGBUS, the same contract llama.cpp's mmap loading has).
        let map = unsafe { Mmap::map(&file) }.map_err(|source| HostEngineError::Map {
            path: path.into(),
            source,
        })?;
        Ok(MappedModel {
            path: path.into(),
            map,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn parse(&self) -> Result<Gguf<'_>, HostEngineError> {
        Gguf::parse(&self.map).map_err(|source| HostEngineError::Gguf {
            path: self.path.clone(),
            source,
        })
    }

    pub fn load<'a>(&self, gguf: &Gguf<'a>) -> Result<Model<'a>, HostEngineError> {
        Model::load(gguf).map_err(|source| HostEngineError::Model {
            path: self.path.clone(),
            source,
        })
    }
}

/// Options of one host run.
#[derive(Debug, Clone)]
pub struct HostOptions {
    pub threads: usize,
    /// 0 = the engine's default (4096, capped by the model).
    pub n_ctx: usize,
    pub max_batch: usize,
    pub max_tokens: usize,
    pub sampling: SamplerConfig,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// Force a SIMD level (tests, benchmarks); None = the best this CPU has.
    pub kernels: Option<Kernels>,
}

/// What one completion did and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub arch: &'static str,
    pub threads: usize,
    pub simd: String,
    /// Prompt tokens processed (a chat turn reuses the cached conversation).
    pub prompt_tokens: usize,
    pub prompt_ms: f64,
    pub ttft_ms: f64,
    pub gen_tokens: usize,
    pub gen_ms: f64,
    /// Milliseconds from the start of the request at which each generated token was produced.
    pub token_ms: Vec<f64>,
    pub prompt_tok_s: f64,
    pub gen_tok_s: f64,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: &'static str,
}

/// The engine ready on the host: mapped model, thread pool, session.
pub struct HostEngine<'a> {
    pub model: Model<'a>,
    pub session: Session,
    pool: ThreadPool,
    options: HostOptions,
}

impl<'a> HostEngine<'a> {
    pub fn new(model: Model<'a>, options: HostOptions) -> Result<Self, HostEngineError> {
        options
            .sampling
            .validate()
            .map_err(HostEngineError::Sampling)?;
        let threads = options.threads.max(1);
        let mut limits = SessionLimits::for_model(&model.config, threads);
        if options.n_ctx != 0 {
            if options.n_ctx > model.config.n_ctx_train {
                return Err(HostEngineError::ContextSize {
                    requested: options.n_ctx,
                    max: model.config.n_ctx_train,
                });
            }
            limits.n_ctx = options.n_ctx;
        }
        if options.max_batch != 0 {
            limits.max_batch = options.max_batch;
        }
        let kernels = options.kernels.unwrap_or_else(Kernels::detect);
        let session = Session::new(&model, limits, kernels);
        let pool = ThreadPool::new(threads)
            .map_err(|source| HostEngineError::Threads { threads, source })?;
        Ok(HostEngine {
            model,
            session,
            pool,
            options,
        })
    }

    /// Tokenizes `text` as llama.cpp does for a prompt (BOS per the model, special tokens parsed).
    pub fn tokenize_prompt(&self, text: &str) -> Vec<u32> {
        self.model.tokenizer.encode(text, true, true)
    }

    /// Runs one completion after `prompt` (the whole context; the session reuses
    /// whatever prefix of it it already holds),
    /// calling `on_text` with each piece of text as it is produced.
    pub fn complete(
        &mut self,
        prompt: &[u32],
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Report, HostEngineError> {
        if prompt.is_empty() {
            return Err(HostEngineError::EmptyPrompt);
        }
        let req = Request {
            prompt,
            max_tokens: self.options.max_tokens,
            sampling: self.options.sampling,
            stop_at_eog: !self.options.ignore_eos,
        };
        let start = Instant::now();
        let mut prompt_ms = 0.0;
        let mut prompt_fed = prompt.len();
        let mut token_ms = Vec::with_capacity(req.max_tokens);
        let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1e3;
        let outcome = generate(&self.model, &mut self.session, &self.pool, &req, &mut |e| {
            match e {
                Event::PromptProcessed { n_fed, .. } => {
                    prompt_ms = ms(Instant::now());
                    prompt_fed = n_fed;
                }
                Event::Token { text, .. } => {
                    token_ms.push(ms(Instant::now()));
                    on_text(text);
                }
                Event::Tail { text } => on_text(text),
            }
            Flow::Continue
        })
        .map_err(HostEngineError::Generate)?;
        let gen_tokens = outcome.tokens.len();
        let ttft_ms = token_ms.first().copied().unwrap_or(prompt_ms);
        let gen_ms = token_ms.last().map_or(0.0, |last| last - ttft_ms);
        Ok(Report {
            model: self.model.name.to_string(),
            arch: self.model.config.arch.name(),
            threads: self.pool_workers(),
            simd: format!("{:?}", self.session.kernels().level()),
            prompt_tokens: prompt_fed,
            prompt_ms,
            ttft_ms,
            gen_tokens,
            gen_ms,
            prompt_tok_s: rate(prompt_fed, prompt_ms),
            gen_tok_s: rate(gen_tokens.saturating_sub(1), gen_ms),
            token_ms,
            tokens: outcome.tokens,
            text: outcome.text,
            stop: outcome.stop.as_str(),
        })
    }

    fn render(&self, template: ChatTemplate, history: &[(Role, String)]) -> Vec<u32> {
        let messages: Vec<Message<'_>> = history
            .iter()
            .map(|(role, content)| Message {
                role: *role,
                content,
            })
            .collect();
        self.tokenize_prompt(&template.render(&messages, true))
    }

    fn pool_workers(&self) -> usize {
        use aivmm_engine::parallel::Parallel;
        self.pool.n_workers()
    }

    /// An interactive chat on `input`/`output`: each user line is a turn; the
    /// KV cache keeps the conversation so only the new turn is fed.
    pub fn chat(
        &mut self,
        template: ChatTemplate,
        system: Option<&str>,
        input: &mut dyn BufRead,
        output: &mut dyn Write,
        summary: &mut dyn Write,
    ) -> Result<(), HostEngineError> {
        let mut history: Vec<(Role, String)> = Vec::new();
        if let Some(s) = system {
            history.push((Role::System, s.to_string()));
        }
        loop {
            write!(output, "> ")
                .and_then(|_| output.flush())
                .map_err(HostEngineError::Output)?;
            let mut line = String::new();
            if input
                .read_line(&mut line)
                .map_err(HostEngineError::Output)?
                == 0
            {
                writeln!(output).map_err(HostEngineError::Output)?;
                return Ok(());
            }
            let line = line.trim_end_matches(['\n', '\r']);
            if line.trim().is_empty() {
                continue;
            }
            history.push((Role::User, line.to_string()));
            let mut tokens = self.render(template, &history);
            if tokens.len() + self.options.max_tokens > self.session.limits().n_ctx {
                // Forget the oldest turns rather than fail: keep the system text and this turn.
                writeln!(summary, "[context full: earlier turns forgotten]")
                    .map_err(HostEngineError::Output)?;
                history.retain(|(r, _)| *r == Role::System);
                history.push((Role::User, line.to_string()));
                tokens = self.render(template, &history);
                if tokens.len() + self.options.max_tokens > self.session.limits().n_ctx {
                    writeln!(
                        summary,
                        "[this message alone does not fit the context; raise --ctx-size]"
                    )
                    .map_err(HostEngineError::Output)?;
                    history.pop();
                    continue;
                }
            }
            let mut write_err = None;
            // The whole conversation goes in; the session feeds only what it has not cached.
            let report = self.complete(&tokens, &mut |t| {
                if let Err(e) = output.write_all(t.as_bytes()).and_then(|_| output.flush()) {
                    write_err.get_or_insert(e);
                }
            })?;
            if let Some(e) = write_err {
                return Err(HostEngineError::Output(e));
            }
            writeln!(output).map_err(HostEngineError::Output)?;
            print_summary(summary, &report).map_err(HostEngineError::Output)?;
            history.push((Role::Assistant, report.text.clone()));
        }
    }
}

fn rate(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1e3 / ms
    } else {
        0.0
    }
}

/// The human summary printed to stderr after a completion.
pub fn print_summary(w: &mut dyn Write, r: &Report) -> std::io::Result<()> {
    writeln!(
        w,
        "[{} tokens prompt in {:.1} ms ({:.1} tok/s) | first token {:.1} ms | {} tokens generated at {:.1} tok/s | {} threads, {} | stop: {}]",
        r.prompt_tokens, r.prompt_ms, r.prompt_tok_s, r.ttft_ms, r.gen_tokens, r.gen_tok_s, r.threads, r.simd, r.stop
    )
}
