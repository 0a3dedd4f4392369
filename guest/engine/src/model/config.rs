//! Hyperparameters of a model, read from GGUF metadata, and the few ways the
//! supported architectures differ. The forward pass is one piece of code
//! parameterized by this struct.

use alloc::string::String;

use super::math::RopePairing;
use super::ModelError;
use crate::gguf::Gguf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// LLaMA 1/2/3, TinyLlama, Mistral-style GQA models.
    Llama,
    /// Qwen2: LLaMA with Q/K/V biases and NeoX RoPE.
    Qwen2,
    /// Gemma 3: scaled embeddings, four norms per block, Q/K norms, GELU,
    /// sliding-window layers with their own RoPE base.
    Gemma3,
}

impl Arch {
    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "gemma3" => Some(Arch::Gemma3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnActivation {
    Silu,
    GeluTanh,
}

/// Everything the forward pass needs to know about the model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    /// Context length the model was trained with.
    pub n_ctx_train: usize,
    pub norm_eps: f32,
    pub rope_pairing: RopePairing,
    pub n_rot: usize,
    pub rope_base: f32,
    pub rope_freq_scale: f32,
    /// Sliding-window attention: (window, base of RoPE on the windowed layers).
    pub sliding_window: Option<(usize, f32)>,
    /// Multiplier of the token embedding (sqrt(n_embd) for Gemma).
    pub embd_scale: Option<f32>,
    pub ffn_activation: FfnActivation,
    /// Scale of Q·K.
    pub attn_scale: f32,
    /// Whether the scale multiplies Q before attention (Gemma, as llama.cpp's
    /// graph does) rather than the scores: Q is rounded to f16 after it.
    pub scale_q: bool,
    pub final_logit_softcap: Option<f32>,
}

impl Config {
    pub fn from_gguf(g: &Gguf<'_>) -> Result<Config, ModelError> {
        let arch_name = g
            .get_str("general.architecture")
            .ok_or(ModelError::MissingMetadata {
                key: "general.architecture".into(),
            })?;
        let arch = Arch::from_name(arch_name)
            .ok_or_else(|| ModelError::UnsupportedArchitecture(arch_name.into()))?;
        let key = |k: &str| -> String { alloc::format!("{arch_name}.{k}") };
        let req = |k: &str| -> Result<usize, ModelError> {
            let full = key(k);
            let v = g
                .get_u32(&full)
                .ok_or(ModelError::MissingMetadata { key: full.clone() })?;
            if v == 0 {
                return Err(ModelError::BadMetadata {
                    key: full,
                    reason: "must be greater than zero",
                });
            }
            Ok(v as usize)
        };
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = g
            .get_u32(&key("attention.head_count_kv"))
            .map_or(n_head, |v| v as usize);
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(ModelError::BadMetadata {
                key: key("attention.head_count_kv"),
                reason: "must divide attention.head_count",
            });
        }
        let head_dim = match g.get_u32(&key("attention.key_length")) {
            Some(v) => v as usize,
            None => {
                if n_embd % n_head != 0 {
                    return Err(ModelError::BadMetadata {
                        key: key("attention.head_count"),
                        reason: "does not divide embedding_length",
                    });
                }
                n_embd / n_head
            }
        };
        if let Some(v) = g.get_u32(&key("attention.value_length")) {
            if v as usize != head_dim {
                return Err(ModelError::BadMetadata {
                    key: key("attention.value_length"),
                    reason: "differs from key_length, which is not supported",
                });
            }
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(ModelError::BadMetadata {
                key: key("attention.key_length"),
                reason: "must be even and non-zero",
            });
        }
        let n_rot = g
            .get_u32(&key("rope.dimension_count"))
            .map_or(head_dim, |v| v as usize);
        if n_rot > head_dim || n_rot % 2 != 0 {
            return Err(ModelError::BadMetadata {
                key: key("rope.dimension_count"),
                reason: "must be even and at most the head dimension",
            });
        }
        let rope_freq_scale = match g.get_str(&key("rope.scaling.type")) {
            None | Some("none") => 1.0,
            Some("linear") => {
                let factor = g.get_f32(&key("rope.scaling.factor")).unwrap_or(1.0);
                if factor <= 0.0 {
                    return Err(ModelError::BadMetadata {
                        key: key("rope.scaling.factor"),
                        reason: "must be positive",
                    });
                }
                1.0 / factor
            }
            Some(other) => return Err(ModelError::UnsupportedRopeScaling(other.into())),
        };
        let norm_eps = g.get_f32(&key("attention.layer_norm_rms_epsilon")).ok_or(
            ModelError::MissingMetadata {
                key: key("attention.layer_norm_rms_epsilon"),
            },
        )?;

        let n_vocab = match g.get_u32(&key("vocab_size")) {
            Some(v) => v as usize,
            None => g
                .get_array("tokenizer.ggml.tokens")
                .map(|a| a.len())
                .ok_or(ModelError::MissingMetadata {
                    key: "tokenizer.ggml.tokens".into(),
                })?,
        };

        let (rope_pairing, ffn_activation, embd_scale, sliding_window, default_base) = match arch {
            Arch::Llama => (
                RopePairing::Adjacent,
                FfnActivation::Silu,
                None,
                None,
                10_000.0,
            ),
            Arch::Qwen2 => (RopePairing::Neox, FfnActivation::Silu, None, None, 10_000.0),
            Arch::Gemma3 => {
                let window = g
                    .get_u32(&key("attention.sliding_window"))
                    .map(|w| (w as usize, 10_000.0));
                (
                    RopePairing::Neox,
                    FfnActivation::GeluTanh,
                    Some(libm::sqrtf(n_embd as f32)),
                    window,
                    1_000_000.0,
                )
            }
        };

        Ok(Config {
            arch,
            n_vocab,
            n_embd,
            n_layer: req("block_count")?,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: req("feed_forward_length")?,
            n_ctx_train: req("context_length")?,
            norm_eps,
            rope_pairing,
            n_rot,
            rope_base: g.get_f32(&key("rope.freq_base")).unwrap_or(default_base),
            rope_freq_scale,
            sliding_window,
            embd_scale,
            ffn_activation,
            attn_scale: 1.0 / libm::sqrtf(head_dim as f32),
            scale_q: arch == Arch::Gemma3,
            final_logit_softcap: g
                .get_f32(&key("final_logit_softcapping"))
                .filter(|&c| c > 0.0),
        })
    }

    /// Width of the K (and V) rows of one token in one layer.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Whether layer `il` attends through the sliding window (Gemma 3: five
    /// local layers, then one global).
    pub fn is_sliding(&self, il: usize) -> bool {
        self.sliding_window.is_some() && il % 6 < 5
    }

    /// RoPE (base, frequency scale) of layer `il`.
    pub fn rope_of_layer(&self, il: usize) -> (f32, f32) {
        match self.sliding_window {
            Some((_, local_base)) if self.is_sliding(il) => (local_base, 1.0),
            _ => (self.rope_base, self.rope_freq_scale),
        }
    }
}
