//! A loaded model and the forward pass.
//!
//! [`Model`] borrows its weights from the mapped GGUF file. A [`Session`] owns
//! everything that changes while generating (KV cache, activations); all of it
//! is allocated once, up front, in [`Session::new`], whose size
//! [`Session::memory_required`] computes from the model alone so that the
//! inference kernel can reserve exactly that much guest memory.

pub mod config;
pub mod math;
pub mod weights;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

pub use config::{Arch, Config, FfnActivation};
use weights::{Matrix, Weights};

use crate::gguf::Gguf;
use crate::parallel::{ChunkCounter, DisjointSlice, Parallel, RangeSplit};
use crate::quant::{dequantize_row, f16_to_f32, GgmlType, Kernels};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Why a model can't be loaded or run.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelError {
    UnsupportedArchitecture(String),
    MissingMetadata {
        key: String,
    },
    BadMetadata {
        key: String,
        reason: &'static str,
    },
    UnsupportedRopeScaling(String),
    MissingTensor(String),
    TensorShape {
        name: String,
        expected: [u64; 2],
        found: [u64; 2],
    },
    Tokenizer(TokenizerError),
    TokenOutOfRange {
        token: u32,
        n_vocab: usize,
    },
    /// The request needs more context than the session was created with.
    ContextFull {
        needed: usize,
        n_ctx: usize,
    },
    EmptyPrompt,
    /// More workers than the session reserved scratch memory for.
    TooManyWorkers {
        workers: usize,
        max: usize,
    },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnsupportedArchitecture(a) => {
                write!(f, "model architecture {a:?} is not supported (supported: llama, qwen2, gemma3)")
            }
            Self::MissingMetadata { key } => write!(f, "model metadata lacks {key:?}"),
            Self::BadMetadata { key, reason } => write!(f, "model metadata {key:?} {reason}"),
            Self::UnsupportedRopeScaling(t) => write!(f, "RoPE scaling type {t:?} is not supported (none, linear are)"),
            Self::MissingTensor(t) => write!(f, "model lacks tensor {t:?}"),
            Self::TensorShape { name, expected, found } => write!(
                f,
                "tensor {name:?} has shape {found:?}, expected {expected:?} from the model's metadata"
            ),
            Self::Tokenizer(e) => write!(f, "tokenizer: {e}"),
            Self::TokenOutOfRange { token, n_vocab } => {
                write!(f, "token id {token} is outside the vocabulary (size {n_vocab})")
            }
            Self::ContextFull { needed, n_ctx } => write!(
                f,
                "context is full: {needed} positions needed, the session holds {n_ctx} (raise the context size)"
            ),
            Self::EmptyPrompt => write!(f, "the prompt is empty: nothing to generate from"),
            Self::TooManyWorkers { workers, max } => {
                write!(f, "{workers} workers, but the session was sized for {max}")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ModelError {}

impl From<TokenizerError> for ModelError {
    fn from(e: TokenizerError) -> Self {
        ModelError::Tokenizer(e)
    }
}

/// A model ready to run: config, weights (views into the file), tokenizer.
pub struct Model<'a> {
    pub config: Config,
    pub weights: Weights<'a>,
    pub tokenizer: Tokenizer<'a>,
    /// A short name for logs ("general.name", else the architecture).
    pub name: &'a str,
}

impl<'a> Model<'a> {
    pub fn load(gguf: &Gguf<'a>) -> Result<Self, ModelError> {
        let config = Config::from_gguf(gguf)?;
        let weights = Weights::from_gguf(gguf, &config)?;
        let tokenizer = Tokenizer::from_gguf(gguf)?;
        if tokenizer.n_vocab() > config.n_vocab {
            return Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.tokens".into(),
                reason: "has more tokens than the embedding has rows",
            });
        }
        let name = gguf.get_str("general.name").unwrap_or(config.arch.name());
        Ok(Model {
            config,
            weights,
            tokenizer,
            name,
        })
    }
}

/// Size limits of a session, chosen by its creator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Context length (positions held by the KV cache).
    pub n_ctx: usize,
    /// Tokens per forward pass (prompts are processed in batches of this size).
    pub max_batch: usize,
    /// Workers the scratch memory is sized for.
    pub max_workers: usize,
}

impl SessionLimits {
    /// Defaults: 4096 positions (or the model's own context if smaller), batches of 32.
    pub fn for_model(config: &Config, max_workers: usize) -> Self {
        SessionLimits {
            n_ctx: config.n_ctx_train.min(4096),
            max_batch: 32,
            max_workers: max_workers.max(1),
        }
    }
}

/// Rows of a matmul handed out per chunk, scaled so every worker gets several.
const MAX_CHUNK_ROWS: usize = 128;
/// The same for a matvec (one activation row).
const MAX_MATVEC_CHUNK_ROWS: usize = 1024;

/// The mutable state of one conversation: KV cache, activations and scratch.
pub struct Session {
    limits: SessionLimits,
    kernels: Kernels,
    /// The tokens whose keys and values are in the cache, in order.
    cached: Vec<u32>,
    /// Keys and values as f16, like llama.cpp's default cache types: half
    /// the memory traffic of f32, and the same roundings as llama.cpp.
    k_cache: Vec<u16>,
    v_cache: Vec<u16>,
    x: Vec<f32>,
    xb: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    input: QuantizedInput,
    /// Per worker: one query head and the value accumulator, in f16.
    attn_scratch: Vec<u16>,
    /// RoPE cosines and sines of the position being processed.
    rope_angles: Vec<f32>,
    /// GELU of every f16 value (GELU models only, else empty).
    gelu_table: Vec<u16>,
    chunk_out: Vec<f32>,
    logits: Vec<f32>,
}

/// The activation matrix of a matmul, quantized once per input and reused by
/// every weight matrix that wants the same format (Q, K and V share it).
struct QuantizedInput {
    buf: Vec<u8>,
    ty: Option<GgmlType>,
}

impl QuantizedInput {
    fn invalidate(&mut self) {
        self.ty = None;
    }

    fn get(&mut self, kernels: &Kernels, ty: GgmlType, x: &[f32], n: usize, b: usize) -> &[u8] {
        let row = ty.row_bytes(n).unwrap_or(0);
        if self.ty != Some(ty) {
            for t in 0..b {
                kernels.quantize_row(
                    ty,
                    &x[t * n..(t + 1) * n],
                    &mut self.buf[t * row..(t + 1) * row],
                );
            }
            self.ty = Some(ty);
        }
        &self.buf[..b * row]
    }
}

impl Session {
    fn matrices<'m>(w: &'m Weights<'_>) -> impl Iterator<Item = &'m Matrix<'m>> {
        w.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.wq,
                    &l.wk,
                    &l.wv,
                    &l.wo,
                    &l.ffn_gate,
                    &l.ffn_up,
                    &l.ffn_down,
                ]
            })
            .chain(core::iter::once(&w.output))
    }

    fn max_act_row_bytes(model: &Model<'_>) -> usize {
        Self::matrices(&model.weights)
            .map(|m| m.ty.act_type().row_bytes(m.cols).unwrap_or(0))
            .max()
            .unwrap_or(0)
    }

    /// Bytes of memory a session with these limits allocates.
    pub fn memory_required(model: &Model<'_>, limits: &SessionLimits) -> usize {
        let c = &model.config;
        let b = limits.max_batch;
        let halves =
            2 * c.n_layer * limits.n_ctx * c.kv_dim() + limits.max_workers * 2 * c.head_dim;
        let floats = b * (c.n_embd * 3 + c.q_dim() * 2 + c.kv_dim() * 2 + c.n_ff * 2)
            + limits.max_workers * MAX_CHUNK_ROWS * b
            + c.n_rot
            + c.n_vocab;
        let gelu = Self::gelu_table_len(c);
        (halves + gelu) * 2 + floats * 4 + b * Self::max_act_row_bytes(model)
    }

    fn gelu_table_len(c: &Config) -> usize {
        match c.ffn_activation {
            FfnActivation::GeluTanh => 1 << 16,
            FfnActivation::Silu => 0,
        }
    }

    pub fn new(model: &Model<'_>, limits: SessionLimits, kernels: Kernels) -> Self {
        let c = &model.config;
        let b = limits.max_batch.max(1);
        let limits = SessionLimits {
            max_batch: b,
            ..limits
        };
        let kv = c.n_layer * limits.n_ctx * c.kv_dim();
        Session {
            limits,
            kernels,
            cached: Vec::with_capacity(limits.n_ctx),
            k_cache: vec![0; kv],
            v_cache: vec![0; kv],
            x: vec![0.0; b * c.n_embd],
            xb: vec![0.0; b * c.n_embd],
            q: vec![0.0; b * c.q_dim()],
            k: vec![0.0; b * c.kv_dim()],
            v: vec![0.0; b * c.kv_dim()],
            att: vec![0.0; b * c.q_dim()],
            proj: vec![0.0; b * c.n_embd],
            gate: vec![0.0; b * c.n_ff],
            up: vec![0.0; b * c.n_ff],
            input: QuantizedInput {
                buf: vec![0; b * Self::max_act_row_bytes(model)],
                ty: None,
            },
            attn_scratch: vec![0; limits.max_workers * 2 * c.head_dim],
            rope_angles: vec![0.0; c.n_rot],
            gelu_table: {
                let mut table = vec![0; Self::gelu_table_len(c)];
                if !table.is_empty() {
                    math::gelu_f16_table(&mut table);
                }
                table
            },
            chunk_out: vec![0.0; limits.max_workers * MAX_CHUNK_ROWS * b],
            logits: vec![0.0; c.n_vocab],
        }
    }

    pub fn limits(&self) -> &SessionLimits {
        &self.limits
    }

    /// Positions already in the KV cache.
    pub fn pos(&self) -> usize {
        self.cached.len()
    }

    /// The tokens held by the KV cache.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.cached
    }

    /// Forgets positions from `pos` on (keeps a shared prefix of a conversation).
    pub fn truncate(&mut self, pos: usize) {
        self.cached.truncate(pos);
    }

    /// How many leading tokens of `context` [`Session::feed_context`] would not
    /// feed again. At least the last token is fed: its logits are the point.
    pub fn reusable_prefix(&self, context: &[u32]) -> usize {
        let common = self
            .cached
            .iter()
            .zip(context)
            .take_while(|(a, b)| a == b)
            .count();
        common.min(context.len().saturating_sub(1))
    }

    /// Makes the cache hold exactly `context` and returns its logits, feeding
    /// only what differs from what is already cached: the next turn of a chat,
    /// sent as the whole conversation, costs only its new tokens.
    pub fn feed_context(
        &mut self,
        model: &Model<'_>,
        context: &[u32],
        par: &dyn Parallel,
    ) -> Result<&[f32], ModelError> {
        if context.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        let keep = self.reusable_prefix(context);
        self.truncate(keep);
        self.forward(model, &context[keep..], par)
    }

    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Feeds `tokens` (any number: processed in batches) at the current position and
    /// returns the logits after the last one.
    pub fn forward(
        &mut self,
        model: &Model<'_>,
        tokens: &[u32],
        par: &dyn Parallel,
    ) -> Result<&[f32], ModelError> {
        let needed = self.pos() + tokens.len();
        if needed > self.limits.n_ctx {
            return Err(ModelError::ContextFull {
                needed,
                n_ctx: self.limits.n_ctx,
            });
        }
        if par.n_workers() > self.limits.max_workers {
            return Err(ModelError::TooManyWorkers {
                workers: par.n_workers(),
                max: self.limits.max_workers,
            });
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= model.config.n_vocab) {
            return Err(ModelError::TokenOutOfRange {
                token,
                n_vocab: model.config.n_vocab,
            });
        }
        let batches = tokens.chunks(self.limits.max_batch);
        let n_batches = batches.len();
        for (i, batch) in batches.enumerate() {
            self.forward_batch(model, batch, par, i + 1 == n_batches);
            self.cached.extend_from_slice(batch);
        }
        Ok(&self.logits)
    }

    /// The logits computed by the last [`Session::forward`].
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn forward_batch(
        &mut self,
        model: &Model<'_>,
        tokens: &[u32],
        par: &dyn Parallel,
        want_logits: bool,
    ) {
        let c = &model.config;
        let w = &model.weights;
        let b = tokens.len();
        let pos0 = self.pos();
        let (n_embd, q_dim, kv_dim, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);

        for (t, &tok) in tokens.iter().enumerate() {
            let x = &mut self.x[t * n_embd..(t + 1) * n_embd];
            dequantize_row(w.token_embd.ty, w.token_embd.row(tok as usize), x);
            if let Some(s) = c.embd_scale {
                x.iter_mut().for_each(|v| *v *= s);
            }
        }

        for (il, layer) in w.layers.iter().enumerate() {
            // Attention block.
            for t in 0..b {
                let r = t * n_embd..(t + 1) * n_embd;
                math::rms_norm(
                    &mut self.xb[r.clone()],
                    &self.x[r],
                    &layer.attn_norm,
                    c.norm_eps,
                );
            }
            self.input.invalidate();
            for (m, out, bias) in [
                (&layer.wq, &mut self.q, &layer.bq),
                (&layer.wk, &mut self.k, &layer.bk),
                (&layer.wv, &mut self.v, &layer.bv),
            ] {
                let act = self
                    .input
                    .get(&self.kernels, m.ty.act_type(), &self.xb, n_embd, b);
                matmul(&self.kernels, par, m, act, b, out, &mut self.chunk_out);
                if let Some(bias) = bias {
                    for row in out[..b * m.rows].chunks_exact_mut(m.rows) {
                        row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
                    }
                }
            }
            let (base, freq_scale) = c.rope_of_layer(il);
            let freqs = w.rope_freqs.as_deref();
            for t in 0..b {
                let pos = pos0 + t;
                let angles = &mut self.rope_angles[..c.n_rot];
                math::rope_angles(angles, pos, base, freq_scale, freqs);
                for head in self.q[t * q_dim..(t + 1) * q_dim].chunks_exact_mut(hd) {
                    if let Some(norm) = &layer.q_norm {
                        math::rms_norm_inplace(head, norm, c.norm_eps);
                    }
                    math::rope(head, angles, c.rope_pairing, &self.kernels);
                }
                for head in self.k[t * kv_dim..(t + 1) * kv_dim].chunks_exact_mut(hd) {
                    if let Some(norm) = &layer.k_norm {
                        math::rms_norm_inplace(head, norm, c.norm_eps);
                    }
                    math::rope(head, angles, c.rope_pairing, &self.kernels);
                }
            }
            if c.scale_q {
                let s = c.attn_scale;
                self.q[..b * q_dim].iter_mut().for_each(|v| *v *= s);
            }
            let layer_base = il * self.limits.n_ctx * kv_dim;
            let at = layer_base + pos0 * kv_dim;
            let kv = at..at + b * kv_dim;
            self.kernels
                .f32_to_f16_row(&mut self.k_cache[kv.clone()], &self.k[..b * kv_dim]);
            self.kernels
                .f32_to_f16_row(&mut self.v_cache[kv], &self.v[..b * kv_dim]);
            let window = if c.is_sliding(il) {
                c.sliding_window.map(|(w, _)| w)
            } else {
                None
            };
            self.attention(c, layer_base, pos0, b, window, par);

            self.input.invalidate();
            let act = self
                .input
                .get(&self.kernels, layer.wo.ty.act_type(), &self.att, q_dim, b);
            matmul(
                &self.kernels,
                par,
                &layer.wo,
                act,
                b,
                &mut self.proj,
                &mut self.chunk_out,
            );
            self.add_residual(&layer.post_attn_norm, c.norm_eps, n_embd, b);

            // Feed-forward block.
            for t in 0..b {
                let r = t * n_embd..(t + 1) * n_embd;
                math::rms_norm(
                    &mut self.xb[r.clone()],
                    &self.x[r],
                    &layer.ffn_norm,
                    c.norm_eps,
                );
            }
            self.input.invalidate();
            for (m, out) in [
                (&layer.ffn_gate, &mut self.gate),
                (&layer.ffn_up, &mut self.up),
            ] {
                let act = self
                    .input
                    .get(&self.kernels, m.ty.act_type(), &self.xb, n_embd, b);
                matmul(&self.kernels, par, m, act, b, out, &mut self.chunk_out);
            }
            let n_ff = c.n_ff;
            for (g, u) in self.gate[..b * n_ff].iter_mut().zip(&self.up[..b * n_ff]) {
                *g = match c.ffn_activation {
                    FfnActivation::Silu => math::silu(*g),
                    FfnActivation::GeluTanh => math::gelu_ggml(&self.gelu_table, *g),
                } * u;
            }
            self.input.invalidate();
            let act = self.input.get(
                &self.kernels,
                layer.ffn_down.ty.act_type(),
                &self.gate,
                n_ff,
                b,
            );
            matmul(
                &self.kernels,
                par,
                &layer.ffn_down,
                act,
                b,
                &mut self.proj,
                &mut self.chunk_out,
            );
            self.add_residual(&layer.post_ffn_norm, c.norm_eps, n_embd, b);
        }
        if want_logits {
            let last = &self.x[(b - 1) * n_embd..b * n_embd];
            math::rms_norm(&mut self.xb[..n_embd], last, &w.output_norm, c.norm_eps);
            self.input.invalidate();
            let act = self
                .input
                .get(&self.kernels, w.output.ty.act_type(), &self.xb, n_embd, 1);
            matmul(
                &self.kernels,
                par,
                &w.output,
                act,
                1,
                &mut self.logits,
                &mut self.chunk_out,
            );
            if let Some(cap) = c.final_logit_softcap {
                self.logits
                    .iter_mut()
                    .for_each(|l| *l = cap * libm::tanhf(*l / cap));
            }
        }
    }

    /// x += (optionally normed) proj.
    fn add_residual(&mut self, post_norm: &Option<Vec<f32>>, eps: f32, n_embd: usize, b: usize) {
        for t in 0..b {
            let proj = &mut self.proj[t * n_embd..(t + 1) * n_embd];
            if let Some(norm) = post_norm {
                math::rms_norm_inplace(proj, norm, eps);
            }
            self.x[t * n_embd..(t + 1) * n_embd]
                .iter_mut()
                .zip(proj.iter())
                .for_each(|(x, p)| *x += p);
        }
    }

    /// Causal (optionally sliding-window) grouped-query attention of the batch's
    /// queries against the f16 cache, one (token, head) pair per work item.
    ///
    /// The arithmetic is ggml-cpu's flash attention with an f16 cache: the
    /// query rounded to f16, f16 dot products, an online softmax over the
    /// positions in order, and the weighted sum of values accumulated in f16.
    fn attention(
        &mut self,
        c: &Config,
        layer_base: usize,
        pos0: usize,
        b: usize,
        window: Option<usize>,
        par: &dyn Parallel,
    ) {
        let (hd, q_dim, kv_dim) = (c.head_dim, c.q_dim(), c.kv_dim());
        let group = c.n_head / c.n_head_kv;
        let score_scale = if c.scale_q { 1.0 } else { c.attn_scale };
        let kernels = &self.kernels;
        let (q, k_cache, v_cache) = (&self.q, &self.k_cache, &self.v_cache);
        let att = DisjointSlice::new(&mut self.att);
        let scratch = DisjointSlice::new(&mut self.attn_scratch);
        let items = ChunkCounter::new(b * c.n_head, 1);
        par.run(&|worker| {
            // SAFETY: each worker uses only its own scratch block.
            let scratch = unsafe { scratch.range(worker * 2 * hd..(worker + 1) * 2 * hd) };
            let (q16, acc) = scratch.split_at_mut(hd);
            while let Some(item) = items.next() {
                let (t, h) = (item.start / c.n_head, item.start % c.n_head);
                let pos = pos0 + t;
                let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                kernels.f32_to_f16_row(q16, &q[t * q_dim + h * hd..t * q_dim + (h + 1) * hd]);
                let kv_off = (h / group) * hd;
                acc.fill(0);
                let (mut sum, mut max) = (0.0f32, f32::NEG_INFINITY);
                for j in first..=pos {
                    let start = layer_base + j * kv_dim + kv_off;
                    let s = kernels.dot_f16(&k_cache[start..start + hd], q16) * score_scale;
                    let (mut ms, mut vs) = (1.0f32, 1.0f32);
                    if s > max {
                        ms = math::exp(max - s);
                        max = s;
                        kernels.scale_f16(acc, ms);
                    } else {
                        vs = math::exp(s - max);
                    }
                    kernels.mad_f16(acc, &v_cache[start..start + hd], vs);
                    // ggml's compiled code fuses this into an FMA.
                    sum = kernels.fmadd(sum, ms, vs);
                }
                let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
                // SAFETY: (t, h) items are handed out once each; their output ranges are disjoint.
                let out = unsafe { att.range(t * q_dim + h * hd..t * q_dim + (h + 1) * hd) };
                for (o, &a) in out.iter_mut().zip(acc.iter()) {
                    *o = f16_to_f32(a) * inv;
                }
            }
        });
    }
}

/// out[t * rows + r] = dot(w row r, activation t) for the `b` activations, rows
/// split in chunks across the workers.
fn matmul(
    kernels: &Kernels,
    par: &dyn Parallel,
    w: &Matrix<'_>,
    act: &[u8],
    b: usize,
    out: &mut [f32],
    chunk_out: &mut [f32],
) {
    let rows = w.rows;
    let row_bytes = w.row_bytes();
    // A matvec needs no scratch: its chunks may be longer (fewer hand-outs).
    // Each worker streams through its own range of rows (`RangeSplit`), and
    // its matvecs prefetch on into the rows of its next chunk.
    let max_chunk = if b == 1 {
        MAX_MATVEC_CHUNK_ROWS
    } else {
        MAX_CHUNK_ROWS
    };
    let chunk = (rows / (par.n_workers() * 8)).clamp(16, max_chunk);
    let split = RangeSplit::new(rows, par.n_workers(), chunk, 8);
    let out = DisjointSlice::new(&mut out[..b * rows]);
    let scratch = DisjointSlice::new(chunk_out);
    par.run(&|worker| {
        while let Some(chunk) = split.next(worker) {
            let r = chunk.range;
            let wrows = &w.data[r.start * row_bytes..r.end * row_bytes];
            if b == 1 {
                // SAFETY: chunks of rows are handed out once each, so the ranges are disjoint.
                let o = unsafe { out.range(r.clone()) };
                kernels.matvec_then(w.ty, w.cols, wrows, chunk.then, act, o);
            } else {
                let n = r.len();
                // SAFETY: each worker uses only its own scratch block.
                let tmp = unsafe {
                    scratch.range(worker * MAX_CHUNK_ROWS * b..(worker * MAX_CHUNK_ROWS + n) * b)
                };
                kernels.matmul(w.ty, w.cols, wrows, act, b, tmp, n);
                for t in 0..b {
                    // SAFETY: rows r of token t belong to this chunk only.
                    let o = unsafe { out.range(t * rows + r.start..t * rows + r.end) };
                    o.copy_from_slice(&tmp[t * n..(t + 1) * n]);
                }
            }
        }
    });
}
