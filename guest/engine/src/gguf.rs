//! GGUF v2/v3 reader over a byte slice.
//!
//! The file is untrusted input: every count, length, offset and size is
//! checked against the slice while parsing, so that once [`Gguf::parse`]
//! returns, every accessor is infallible and every tensor is a validated view
//! into the mapped file (nothing is copied).

use alloc::vec::Vec;
use core::fmt;

use crate::quant::{ggml_type_name, GgmlType};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;

/// Why a GGUF file was rejected.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufError {
    /// The file ends before a field that should be there.
    Truncated {
        what: &'static str,
        offset: usize,
    },
    BadMagic([u8; 4]),
    UnsupportedVersion(u32),
    /// A string is not valid UTF-8.
    InvalidUtf8 {
        what: &'static str,
        offset: usize,
    },
    UnknownValueType {
        key: alloc::string::String,
        ty: u32,
    },
    NestedArray {
        key: alloc::string::String,
    },
    DuplicateKey(alloc::string::String),
    BadAlignment(u64),
    BadDims {
        tensor: alloc::string::String,
        reason: &'static str,
    },
    UnsupportedTensorType {
        tensor: alloc::string::String,
        id: u32,
    },
    /// A row length that is not a multiple of the type's block length.
    BadRowLength {
        tensor: alloc::string::String,
        ty: &'static str,
        row: u64,
    },
    MisalignedTensor {
        tensor: alloc::string::String,
        offset: u64,
        alignment: u64,
    },
    TensorOutOfBounds {
        tensor: alloc::string::String,
        start: u64,
        size: u64,
        file_len: u64,
    },
    DuplicateTensor(alloc::string::String),
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { what, offset } => write!(
                f,
                "file is truncated: {what} at byte {offset} runs past the end (incomplete download or copy?)"
            ),
            Self::BadMagic(m) => write!(f, "not a GGUF file: it starts with {m:02x?}, expected \"GGUF\""),
            Self::UnsupportedVersion(v) => write!(
                f,
                "GGUF version {v} is not supported (versions 2 and 3 are; re-convert the model with a current llama.cpp)"
            ),
            Self::InvalidUtf8 { what, offset } => write!(f, "{what} at byte {offset} is not valid UTF-8"),
            Self::UnknownValueType { key, ty } => {
                write!(f, "metadata key {key:?} has unknown value type {ty} (valid: 0..=12)")
            }
            Self::NestedArray { key } => write!(f, "metadata key {key:?} holds nested arrays, which are not supported"),
            Self::DuplicateKey(k) => write!(f, "metadata key {k:?} appears twice"),
            Self::BadAlignment(a) => write!(f, "general.alignment = {a} is not a power of two between 1 and 2^20"),
            Self::BadDims { tensor, reason } => write!(f, "tensor {tensor:?}: {reason}"),
            Self::UnsupportedTensorType { tensor, id } => match ggml_type_name(*id) {
                Some(name) => write!(
                    f,
                    "tensor {tensor:?} has type {name}, which aivmm does not support \
                     (supported: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K); use another quantization of the model"
                ),
                None => write!(f, "tensor {tensor:?} has unknown type id {id}"),
            },
            Self::BadRowLength { tensor, ty, row } => write!(
                f,
                "tensor {tensor:?}: row length {row} is not a multiple of the {ty} block length"
            ),
            Self::MisalignedTensor { tensor, offset, alignment } => write!(
                f,
                "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}"
            ),
            Self::TensorOutOfBounds { tensor, start, size, file_len } => write!(
                f,
                "tensor {tensor:?}: {size} bytes at file offset {start} run past the end of the {file_len}-byte file (truncated file?)"
            ),
            Self::DuplicateTensor(t) => write!(f, "tensor {t:?} appears twice"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for GgufError {}

/// The metadata value types of GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Size in bytes of a scalar of this type (None for strings and arrays).
    fn scalar_size(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }
}

/// A metadata value. Strings and arrays borrow from the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(&'a str),
    Array(Array<'a>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value<'_> {
    /// The value as an unsigned integer, if it is an integer that is non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float (floats, and integers converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// A validated metadata array; elements are decoded on access.
#[derive(Debug, Clone, PartialEq)]
pub struct Array<'a> {
    elem: ValueType,
    len: usize,
    raw: &'a [u8],
}

impl<'a> Array<'a> {
    pub fn elem_type(&self) -> ValueType {
        self.elem
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements of a string array (None if the elements are not strings).
    pub fn strings(&self) -> Option<impl Iterator<Item = &'a str> + '_> {
        (self.elem == ValueType::String).then(|| StringIter { raw: self.raw })
    }

    /// The elements of an f32 array.
    pub fn f32s(&self) -> Option<impl Iterator<Item = f32> + '_> {
        (self.elem == ValueType::F32).then(|| self.fixed::<4>().map(f32::from_le_bytes))
    }

    /// The elements of an i32 array.
    pub fn i32s(&self) -> Option<impl Iterator<Item = i32> + '_> {
        (self.elem == ValueType::I32).then(|| self.fixed::<4>().map(i32::from_le_bytes))
    }

    /// The elements of any integer array, as i64 (u64 values above i64::MAX are skipped: none are expected).
    pub fn ints(&self) -> Option<Vec<i64>> {
        let size = self.elem.scalar_size()?;
        let out = self
            .raw
            .chunks_exact(size)
            .filter_map(|c| {
                let mut b = [0u8; 8];
                b[..size].copy_from_slice(c);
                Some(match self.elem {
                    ValueType::U8 => i64::from(c[0]),
                    ValueType::I8 => i64::from(c[0] as i8),
                    ValueType::U16 => i64::from(u16::from_le_bytes([b[0], b[1]])),
                    ValueType::I16 => i64::from(i16::from_le_bytes([b[0], b[1]])),
                    ValueType::U32 => i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    ValueType::I32 => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    ValueType::U64 => i64::try_from(u64::from_le_bytes(b)).ok()?,
                    ValueType::I64 => i64::from_le_bytes(b),
                    _ => return None,
                })
            })
            .collect();
        matches!(
            self.elem,
            ValueType::U8
                | ValueType::I8
                | ValueType::U16
                | ValueType::I16
                | ValueType::U32
                | ValueType::I32
                | ValueType::U64
                | ValueType::I64
        )
        .then_some(out)
    }

    fn fixed<const N: usize>(&self) -> impl Iterator<Item = [u8; N]> + '_ {
        self.raw.chunks_exact(N).map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            b
        })
    }
}

/// Iterates the strings of an array validated at parse time.
struct StringIter<'a> {
    raw: &'a [u8],
}

impl<'a> Iterator for StringIter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let len_bytes: [u8; 8] = self.raw.get(..8)?.try_into().ok()?;
        let len = usize::try_from(u64::from_le_bytes(len_bytes)).ok()?;
        let bytes = self.raw.get(8..8 + len)?;
        self.raw = &self.raw[8 + len..];
        core::str::from_utf8(bytes).ok()
    }
}

/// One tensor: its name, shape, type and a view of its bytes in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo<'a> {
    pub name: &'a str,
    /// Dimensions, innermost first (dims[0] is the contiguous row length); unused dims are 1.
    pub dims: [u64; 4],
    pub n_dims: u32,
    pub ty: GgmlType,
    /// Offset of the data from the start of the file.
    pub file_offset: u64,
    pub data: &'a [u8],
}

impl TensorInfo<'_> {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row length (dims[0]) and number of rows (product of the other dims).
    pub fn rows_cols(&self) -> (usize, usize) {
        let rows: u64 = self.dims[1..].iter().product();
        // Both fit in usize: their product of bytes was checked against the file length.
        (rows as usize, self.dims[0] as usize)
    }
}

/// A parsed GGUF file.
#[derive(Debug, Clone)]
pub struct Gguf<'a> {
    pub version: u32,
    metadata: Vec<(&'a str, Value<'a>)>,
    tensors: Vec<TensorInfo<'a>>,
    /// Offset of the tensor data section from the start of the file.
    pub data_offset: u64,
    pub alignment: u64,
}

impl<'a> Gguf<'a> {
    /// Parses and validates a whole GGUF file.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, GgufError> {
        let mut r = Reader { bytes, pos: 0 };
        let magic: [u8; 4] = r.array("magic")?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;

        // Counts come from the file: never reserve more than the remaining bytes could hold.
        let mut metadata = Vec::with_capacity(bounded(n_kv, r.remaining() / 13));
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            if metadata.iter().any(|(k, _)| *k == key) {
                return Err(GgufError::DuplicateKey(key.into()));
            }
            let ty = r.u32("metadata value type")?;
            let value = r.value(key, ty)?;
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| *k == "general.alignment") {
            Some((_, v)) => {
                let a = v.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() || a > 1 << 20 {
                    return Err(GgufError::BadAlignment(a));
                }
                a
            }
            None => DEFAULT_ALIGNMENT,
        };

        struct RawTensor<'a> {
            name: &'a str,
            dims: [u64; 4],
            n_dims: u32,
            ty: GgmlType,
            offset: u64,
            size: u64,
        }
        let mut raw = Vec::with_capacity(bounded(n_tensors, r.remaining() / 24));
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::BadDims {
                    tensor: name.into(),
                    reason: "dimension count must be 1..=4",
                });
            }
            let mut dims = [1u64; 4];
            for d in dims.iter_mut().take(n_dims as usize) {
                *d = r.u64("tensor dimension")?;
                if *d == 0 {
                    return Err(GgufError::BadDims {
                        tensor: name.into(),
                        reason: "a dimension is zero",
                    });
                }
            }
            let type_id = r.u32("tensor type")?;
            let ty =
                GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedTensorType {
                    tensor: name.into(),
                    id: type_id,
                })?;
            let offset = r.u64("tensor data offset")?;
            let row = usize::try_from(dims[0])
                .ok()
                .and_then(|n| ty.row_bytes(n))
                .ok_or_else(|| GgufError::BadRowLength {
                    tensor: name.into(),
                    ty: ty.name(),
                    row: dims[0],
                })?;
            let size = dims[1..]
                .iter()
                .try_fold(row as u64, |acc, &d| acc.checked_mul(d))
                .ok_or(GgufError::BadDims {
                    tensor: name.into(),
                    reason: "size overflows",
                })?;
            if offset % alignment != 0 {
                return Err(GgufError::MisalignedTensor {
                    tensor: name.into(),
                    offset,
                    alignment,
                });
            }
            raw.push(RawTensor {
                name,
                dims,
                n_dims,
                ty,
                offset,
                size,
            });
        }

        let data_offset = (r.pos as u64).next_multiple_of(alignment);
        let file_len = bytes.len() as u64;
        let mut tensors: Vec<TensorInfo<'a>> = Vec::with_capacity(raw.len());
        for t in raw {
            if tensors.iter().any(|o| o.name == t.name) {
                return Err(GgufError::DuplicateTensor(t.name.into()));
            }
            let out_of_bounds = || GgufError::TensorOutOfBounds {
                tensor: t.name.into(),
                start: data_offset.saturating_add(t.offset),
                size: t.size,
                file_len,
            };
            let start = data_offset
                .checked_add(t.offset)
                .ok_or_else(out_of_bounds)?;
            let end = start
                .checked_add(t.size)
                .filter(|&e| e <= file_len)
                .ok_or_else(out_of_bounds)?;
            // start <= end <= file_len, which is a usize.
            let data = &bytes[start as usize..end as usize];
            tensors.push(TensorInfo {
                name: t.name,
                dims: t.dims,
                n_dims: t.n_dims,
                ty: t.ty,
                file_offset: start,
                data,
            });
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            data_offset,
            alignment,
        })
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(&'a str, Value<'a>)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.metadata
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    pub fn get_str(&self, key: &str) -> Option<&'a str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An integer value that fits in u32.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key)?.as_u64().and_then(|v| u32::try_from(v).ok())
    }

    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f64().map(|v| v as f32)
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn get_array(&self, key: &str) -> Option<&Array<'a>> {
        match self.get(key)? {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn tensors(&self) -> &[TensorInfo<'a>] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo<'a>> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

fn bounded(count: u64, limit: usize) -> usize {
    usize::try_from(count).unwrap_or(usize::MAX).min(limit)
}

/// A cursor over the file that reports what it was reading when it ran out.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(GgufError::Truncated {
            what,
            offset: self.pos,
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &'static str) -> Result<&'a str, GgufError> {
        let at = self.pos;
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| GgufError::Truncated { what, offset: at })?;
        let bytes = self
            .take(len, what)
            .map_err(|_| GgufError::Truncated { what, offset: at })?;
        core::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 { what, offset: at })
    }

    fn value(&mut self, key: &'a str, ty: u32) -> Result<Value<'a>, GgufError> {
        let vt = ValueType::from_id(ty).ok_or_else(|| GgufError::UnknownValueType {
            key: key.into(),
            ty,
        })?;
        const WHAT: &str = "metadata value";
        Ok(match vt {
            ValueType::U8 => Value::U8(self.array::<1>(WHAT)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(WHAT)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(WHAT)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(WHAT)?)),
            ValueType::U32 => Value::U32(self.u32(WHAT)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(WHAT)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(WHAT)?)),
            ValueType::Bool => Value::Bool(self.array::<1>(WHAT)?[0] != 0),
            ValueType::String => Value::Str(self.string("metadata string")?),
            ValueType::U64 => Value::U64(self.u64(WHAT)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(WHAT)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(WHAT)?)),
            ValueType::Array => {
                let ety = self.u32("array element type")?;
                let elem = ValueType::from_id(ety).ok_or_else(|| GgufError::UnknownValueType {
                    key: key.into(),
                    ty: ety,
                })?;
                let at = self.pos;
                let len = self.u64("array length")?;
                let len = usize::try_from(len).map_err(|_| GgufError::Truncated {
                    what: "array",
                    offset: at,
                })?;
                let start = self.pos;
                match elem {
                    ValueType::Array => return Err(GgufError::NestedArray { key: key.into() }),
                    ValueType::String => {
                        for _ in 0..len {
                            self.string("array string")?;
                        }
                    }
                    _ => {
                        let size = elem.scalar_size().unwrap_or(1);
                        let n = len.checked_mul(size).ok_or(GgufError::Truncated {
                            what: "array",
                            offset: at,
                        })?;
                        self.take(n, "array")?;
                    }
                }
                Value::Array(Array {
                    elem,
                    len,
                    raw: &self.bytes[start..self.pos],
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Builds GGUF files for tests.
    pub(crate) struct Builder {
        kv: Vec<u8>,
        n_kv: u64,
        infos: Vec<u8>,
        n_tensors: u64,
        data: Vec<u8>,
        pub version: u32,
    }

    impl Builder {
        pub fn new() -> Self {
            Builder {
                kv: vec![],
                n_kv: 0,
                infos: vec![],
                n_tensors: 0,
                data: vec![],
                version: 3,
            }
        }
        fn str_bytes(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        pub fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
            Self::str_bytes(&mut self.kv, k);
            self.kv.extend_from_slice(&4u32.to_le_bytes());
            self.kv.extend_from_slice(&v.to_le_bytes());
            self.n_kv += 1;
            self
        }
        pub fn kv_str(&mut self, k: &str, v: &str) -> &mut Self {
            Self::str_bytes(&mut self.kv, k);
            self.kv.extend_from_slice(&8u32.to_le_bytes());
            Self::str_bytes(&mut self.kv, v);
            self.n_kv += 1;
            self
        }
        pub fn kv_strs(&mut self, k: &str, v: &[&str]) -> &mut Self {
            Self::str_bytes(&mut self.kv, k);
            self.kv.extend_from_slice(&9u32.to_le_bytes());
            self.kv.extend_from_slice(&8u32.to_le_bytes());
            self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for s in v {
                Self::str_bytes(&mut self.kv, s);
            }
            self.n_kv += 1;
            self
        }
        pub fn kv_f32s(&mut self, k: &str, v: &[f32]) -> &mut Self {
            Self::str_bytes(&mut self.kv, k);
            self.kv.extend_from_slice(&9u32.to_le_bytes());
            self.kv.extend_from_slice(&6u32.to_le_bytes());
            self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                self.kv.extend_from_slice(&x.to_le_bytes());
            }
            self.n_kv += 1;
            self
        }
        pub fn tensor_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
            while self.data.len() % 32 != 0 {
                self.data.push(0);
            }
            Self::str_bytes(&mut self.infos, name);
            self.infos
                .extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend_from_slice(&d.to_le_bytes());
            }
            self.infos.extend_from_slice(&0u32.to_le_bytes());
            self.infos
                .extend_from_slice(&(self.data.len() as u64).to_le_bytes());
            for v in values {
                self.data.extend_from_slice(&v.to_le_bytes());
            }
            self.n_tensors += 1;
            self
        }
        pub fn build(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&self.version.to_le_bytes());
            out.extend_from_slice(&self.n_tensors.to_le_bytes());
            out.extend_from_slice(&self.n_kv.to_le_bytes());
            out.extend_from_slice(&self.kv);
            out.extend_from_slice(&self.infos);
            while out.len() % 32 != 0 {
                out.push(0);
            }
            out.extend_from_slice(&self.data);
            out
        }
    }

    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        b.kv_str("general.architecture", "llama")
            .kv_u32("llama.block_count", 2)
            .kv_strs("tokenizer.ggml.tokens", &["<unk>", "a", "bc"])
            .kv_f32s("tokenizer.ggml.scores", &[0.0, -1.0, -2.5])
            .tensor_f32("w", &[4, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
            .tensor_f32("n", &[4], &[0.5; 4]);
        b.build()
    }

    #[test]
    fn parses_metadata_and_tensors() {
        let bytes = sample();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture"), Some("llama"));
        assert_eq!(g.get_u32("llama.block_count"), Some(2));
        let toks: Vec<&str> = g
            .get_array("tokenizer.ggml.tokens")
            .unwrap()
            .strings()
            .unwrap()
            .collect();
        assert_eq!(toks, ["<unk>", "a", "bc"]);
        let scores: Vec<f32> = g
            .get_array("tokenizer.ggml.scores")
            .unwrap()
            .f32s()
            .unwrap()
            .collect();
        assert_eq!(scores, [0.0, -1.0, -2.5]);
        assert!(g
            .get_array("tokenizer.ggml.scores")
            .unwrap()
            .strings()
            .is_none());
        let w = g.tensor("w").unwrap();
        assert_eq!(w.rows_cols(), (2, 4));
        assert_eq!(w.ty, GgmlType::F32);
        assert_eq!(&w.data[4..8], &2.0f32.to_le_bytes());
        assert_eq!(g.tensor("n").unwrap().data.len(), 16);
        assert_eq!(g.data_offset % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        for len in 0..bytes.len() {
            assert!(
                Gguf::parse(&bytes[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
    }

    #[test]
    fn rejects_bad_magic_and_version() {
        let mut bytes = sample();
        bytes[0] = b'X';
        assert!(matches!(Gguf::parse(&bytes), Err(GgufError::BadMagic(_))));
        let mut b = Builder::new();
        b.version = 1;
        assert_eq!(
            Gguf::parse(&b.build()).unwrap_err(),
            GgufError::UnsupportedVersion(1)
        );
        b.version = 2;
        assert!(Gguf::parse(&b.build()).is_ok());
    }

    #[test]
    fn huge_counts_fail_without_allocating() {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Gguf::parse(&bytes),
            Err(GgufError::Truncated { .. })
        ));
        // A string whose length claims more than the file holds.
        let mut b = Builder::new();
        b.kv_str("k", "v");
        let mut bytes = b.build();
        bytes[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert!(matches!(
            Gguf::parse(&bytes),
            Err(GgufError::Truncated { .. })
        ));
    }

    #[test]
    fn rejects_bad_offsets_types_and_dims() {
        // Tensor data past the end of the file.
        let mut b = Builder::new();
        b.tensor_f32("t", &[8], &[1.0; 8]);
        let bytes = b.build();
        assert!(matches!(
            Gguf::parse(&bytes[..bytes.len() - 4]),
            Err(GgufError::TensorOutOfBounds { .. })
        ));

        // Patch fields of the single tensor info: name(8+1) n_dims(4) dim(8) type(4) offset(8).
        let info = 24;
        let type_at = info + 9 + 4 + 8;
        let mut bad_type = bytes.clone();
        bad_type[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes()); // IQ2_XXS
        let err = Gguf::parse(&bad_type).unwrap_err();
        assert!(matches!(
            err,
            GgufError::UnsupportedTensorType { id: 16, .. }
        ));
        assert!(alloc::format!("{err}").contains("IQ2_XXS"));
        bad_type[type_at..type_at + 4].copy_from_slice(&999u32.to_le_bytes());
        assert!(matches!(
            Gguf::parse(&bad_type),
            Err(GgufError::UnsupportedTensorType { id: 999, .. })
        ));

        let mut bad_offset = bytes.clone();
        bad_offset[type_at + 4..type_at + 12].copy_from_slice(&7u64.to_le_bytes());
        assert!(matches!(
            Gguf::parse(&bad_offset),
            Err(GgufError::MisalignedTensor { .. })
        ));
        bad_offset[type_at + 4..type_at + 12].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
        assert!(matches!(
            Gguf::parse(&bad_offset),
            Err(GgufError::TensorOutOfBounds { .. })
        ));

        let mut bad_dims = bytes.clone();
        bad_dims[info + 9..info + 13].copy_from_slice(&5u32.to_le_bytes());
        assert!(matches!(
            Gguf::parse(&bad_dims),
            Err(GgufError::BadDims { .. })
        ));
        let mut zero_dim = bytes.clone();
        zero_dim[info + 13..info + 21].copy_from_slice(&0u64.to_le_bytes());
        assert!(matches!(
            Gguf::parse(&zero_dim),
            Err(GgufError::BadDims { .. })
        ));
        let mut huge_dim = bytes;
        huge_dim[info + 13..info + 21].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(Gguf::parse(&huge_dim).is_err());
    }

    #[test]
    fn rejects_unknown_value_type_and_duplicates() {
        let mut b = Builder::new();
        b.kv_u32("a", 1);
        let mut bytes = b.build();
        bytes[24 + 9..24 + 13].copy_from_slice(&13u32.to_le_bytes());
        assert!(matches!(
            Gguf::parse(&bytes),
            Err(GgufError::UnknownValueType { ty: 13, .. })
        ));
        let mut b = Builder::new();
        b.kv_u32("a", 1).kv_u32("a", 2);
        assert!(matches!(
            Gguf::parse(&b.build()),
            Err(GgufError::DuplicateKey(_))
        ));
    }
}
