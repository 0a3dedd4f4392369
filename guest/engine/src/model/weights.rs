//! The model's tensors, found by name and checked against the config. Matrices
//! stay views into the mapped file; the small vectors (norms, biases) are
//! converted to f32 once.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::config::{Arch, Config};
use super::ModelError;
use crate::gguf::{Gguf, TensorInfo};
use crate::quant::{dequantize_row, GgmlType};

/// A weight matrix of `rows` rows of `cols` values, in the file's format.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl Matrix<'_> {
    pub fn row_bytes(&self) -> usize {
        // Validated by the GGUF reader for every tensor it returns.
        self.ty.row_bytes(self.cols).unwrap_or(0)
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
}

#[derive(Debug, Clone)]
pub struct Layer<'a> {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix<'a>,
    pub wk: Matrix<'a>,
    pub wv: Matrix<'a>,
    pub wo: Matrix<'a>,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn_gate: Matrix<'a>,
    pub ffn_up: Matrix<'a>,
    pub ffn_down: Matrix<'a>,
    pub post_ffn_norm: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct Weights<'a> {
    pub token_embd: Matrix<'a>,
    pub layers: Vec<Layer<'a>>,
    pub output_norm: Vec<f32>,
    /// The output projection; the token embedding when the model ties them.
    pub output: Matrix<'a>,
    /// Llama 3.1+ per-pair RoPE frequency divisors.
    pub rope_freqs: Option<Vec<f32>>,
}

impl<'a> Weights<'a> {
    pub fn from_gguf(g: &Gguf<'a>, c: &Config) -> Result<Self, ModelError> {
        let find = |name: &str| g.tensor(name);
        let matrix = |name: String, cols: usize, rows: usize| -> Result<Matrix<'a>, ModelError> {
            let t = find(&name).ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            as_matrix(t, cols, rows)
        };
        let vector = |name: String, len: usize| -> Result<Vec<f32>, ModelError> {
            let t = find(&name).ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
            as_vector(t, len)
        };
        let opt_vector = |name: String, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
            find(&name).map(|t| as_vector(t, len)).transpose()
        };

        let token_embd = matrix("token_embd.weight".into(), c.n_embd, c.n_vocab)?;
        let output = match find("output.weight") {
            Some(t) => as_matrix(t, c.n_embd, c.n_vocab)?,
            None => token_embd,
        };
        let gemma = c.arch == Arch::Gemma3;
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| alloc::format!("blk.{i}.{s}");
            let required_if =
                |cond: bool, name: String, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
                    if cond {
                        vector(name, len).map(Some)
                    } else {
                        opt_vector(name, len)
                    }
                };
            layers.push(Layer {
                attn_norm: vector(n("attn_norm.weight"), c.n_embd)?,
                wq: matrix(n("attn_q.weight"), c.n_embd, c.q_dim())?,
                wk: matrix(n("attn_k.weight"), c.n_embd, c.kv_dim())?,
                wv: matrix(n("attn_v.weight"), c.n_embd, c.kv_dim())?,
                wo: matrix(n("attn_output.weight"), c.q_dim(), c.n_embd)?,
                bq: required_if(c.arch == Arch::Qwen2, n("attn_q.bias"), c.q_dim())?,
                bk: required_if(c.arch == Arch::Qwen2, n("attn_k.bias"), c.kv_dim())?,
                bv: required_if(c.arch == Arch::Qwen2, n("attn_v.bias"), c.kv_dim())?,
                q_norm: required_if(gemma, n("attn_q_norm.weight"), c.head_dim)?,
                k_norm: required_if(gemma, n("attn_k_norm.weight"), c.head_dim)?,
                post_attn_norm: required_if(gemma, n("post_attention_norm.weight"), c.n_embd)?,
                ffn_norm: vector(n("ffn_norm.weight"), c.n_embd)?,
                ffn_gate: matrix(n("ffn_gate.weight"), c.n_embd, c.n_ff)?,
                ffn_up: matrix(n("ffn_up.weight"), c.n_embd, c.n_ff)?,
                ffn_down: matrix(n("ffn_down.weight"), c.n_ff, c.n_embd)?,
                post_ffn_norm: required_if(gemma, n("post_ffw_norm.weight"), c.n_embd)?,
            });
        }
        Ok(Weights {
            token_embd,
            layers,
            output_norm: vector("output_norm.weight".into(), c.n_embd)?,
            output,
            rope_freqs: opt_vector("rope_freqs.weight".into(), c.n_rot / 2)?,
        })
    }

    /// Bytes of weights read for one generated token (everything but the embedding
    /// table, unless it doubles as the output projection).
    pub fn bytes_per_token(&self) -> usize {
        let layer_bytes: usize = self
            .layers
            .iter()
            .map(|l| {
                [l.wq, l.wk, l.wv, l.wo, l.ffn_gate, l.ffn_up, l.ffn_down]
                    .iter()
                    .map(|m| m.data.len())
                    .sum::<usize>()
            })
            .sum();
        layer_bytes + self.output.data.len()
    }
}

fn as_matrix<'a>(t: &TensorInfo<'a>, cols: usize, rows: usize) -> Result<Matrix<'a>, ModelError> {
    let (t_rows, t_cols) = t.rows_cols();
    if t_cols != cols || t_rows != rows || t.n_dims > 2 {
        return Err(ModelError::TensorShape {
            name: t.name.into(),
            expected: [cols as u64, rows as u64],
            found: [t.dims[0], t.dims[1..].iter().product()],
        });
    }
    Ok(Matrix {
        ty: t.ty,
        rows,
        cols,
        data: t.data,
    })
}

fn as_vector(t: &TensorInfo<'_>, len: usize) -> Result<Vec<f32>, ModelError> {
    if t.n_elements() != len as u64 {
        return Err(ModelError::TensorShape {
            name: t.name.into(),
            expected: [len as u64, 1],
            found: [t.dims[0], t.dims[1..].iter().product()],
        });
    }
    let mut out = vec![0.0; len];
    dequantize_row(t.ty, t.data, &mut out);
    Ok(out)
}
