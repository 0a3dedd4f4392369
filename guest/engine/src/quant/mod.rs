//! Tensor formats and their dot-product kernels.
//!
//! Weight rows stay in their GGUF format (ggml block layouts, bit for bit). A
//! matmul first quantizes each activation row into the format ggml pairs with
//! the weight type ([`GgmlType::act_type`]: Q8_0, Q8_1 or Q8_K for the quantized
//! types), then [`Kernels`] computes integer dot products block by block and
//! applies the block scales in f32, like ggml's `vec_dot` functions.
//!
//! `scalar` is the portable reference for every type; `avx2` and `avx512` are
//! the fast paths, chosen at run time from what the CPU and the OS support
//! ([`Kernels::detect`]). Matmuls run in tiles of a few weight rows by a few
//! activation rows (`TileKernels`), so that every weight block loaded from
//! memory is used for several activations and vice versa.

/// `[e(0), e(1), .., e(N - 1)]` built with a plain loop: closures handed to
/// `array::map` are not reliably inlined into `#[target_feature]` code, and a
/// call per element would ruin the kernels.
macro_rules! array_of {
    ($init:expr; $n:expr, |$i:ident| $e:expr) => {{
        let mut out = [$init; $n];
        #[allow(clippy::needless_range_loop)]
        for $i in 0..$n {
            out[$i] = $e;
        }
        out
    }};
}

mod avx2;
mod avx512;
mod cpu;
mod f16_vec;
mod half;
mod scalar;
#[cfg(test)]
mod tests;

pub use half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use scalar::dequantize_row;

/// Number of values in one K-quant super-block.
pub const QK_K: usize = 256;

/// The tensor types this engine can compute with (ggml numbering).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
}

impl GgmlType {
    /// Every supported type, in id order.
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::BF16,
    ];

    /// The type with ggml id `id`, or None if it is unknown or not supported here.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The ggml type id (as stored in GGUF tensor infos).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::BF16 => 30,
        }
    }

    /// The ggml name, e.g. "Q4_K".
    pub fn name(self) -> &'static str {
        match ggml_type_name(self.id()) {
            Some(name) => name,
            None => unreachable!("every supported type has a name"),
        }
    }

    /// Values per block: 1 for the float types, 32 or 256 for the quantized ones.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => 32,
            GgmlType::Q8_0 | GgmlType::Q8_1 => 32,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q8_K => QK_K,
        }
    }

    /// Bytes per block (ggml's `type_size`).
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::Q8_K => 292,
        }
    }

    /// Bytes of a row of `n` values; None if `n` is not a whole number of blocks
    /// or the size overflows.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }

    /// The format activations are converted to before a dot product with a row
    /// of this type (ggml's `vec_dot_type`).
    pub fn act_type(self) -> GgmlType {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => self,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => GgmlType::Q8_1,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q8_K => GgmlType::Q8_K,
        }
    }
}

/// The ggml name of any type id, including the ones this engine cannot compute
/// with (for error messages); None for ids ggml never assigned.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    const NAMES: [&str; 42] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
        "NVFP4",
        "Q1_0",
    ];
    NAMES.get(usize::try_from(id).ok()?).copied()
}

/// The instruction sets a [`Kernels`] may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Portable Rust, the reference.
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F, BW, VL (plus everything of `Avx2`).
    Avx512,
    /// `Avx512` plus VNNI (`vpdpbusd`, `vpdpwssd`).
    Avx512Vnni,
}

/// The dot-product kernels of one [`SimdLevel`]; cheap to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    level: SimdLevel,
}

/// Activation bytes (of all columns of a matmul tile) meant to stay in L2.
const ACT_TILE_BYTES: usize = 384 * 1024;

impl Kernels {
    /// The fastest kernels this CPU and OS support (detected once, then cached).
    pub fn detect() -> Kernels {
        Kernels {
            level: cpu::best_level(),
        }
    }

    /// The kernels of `level`, or None if this CPU (or OS) can't run them.
    pub fn with_level(level: SimdLevel) -> Option<Kernels> {
        (level <= cpu::best_level()).then_some(Kernels { level })
    }

    pub fn level(&self) -> SimdLevel {
        self.level
    }

    /// `a * b + c` with one rounding, as ggml's compiled C computes the
    /// expressions the compiler contracted to FMA instructions.
    pub fn fmadd(&self, a: f32, b: f32, c: f32) -> f32 {
        match self.level {
            SimdLevel::Scalar => libm::fmaf(a, b, c),
            // SAFETY: a non-scalar level is only constructed when the CPU and OS support AVX2, FMA and F16C.
            _ => unsafe { avx2::fmadd(a, b, c) },
        }
    }

    /// Dot product of two f16 rows (ggml-cpu's `ggml_vec_dot_f16` order).
    pub fn dot_f16(&self, x: &[u16], y: &[u16]) -> f32 {
        match self.level {
            SimdLevel::Scalar => f16_vec::dot(x, y),
            // SAFETY: a non-scalar level is only constructed when the CPU and OS support AVX2, FMA and F16C.
            _ => unsafe { f16_vec::avx2::dot(x, y) },
        }
    }

    /// `y = f16(y + x * v)` element-wise (`ggml_vec_mad_f16`).
    pub fn mad_f16(&self, y: &mut [u16], x: &[u16], v: f32) {
        match self.level {
            SimdLevel::Scalar => f16_vec::mad(y, x, v),
            // SAFETY: as in `dot_f16`.
            _ => unsafe { f16_vec::avx2::mad(y, x, v) },
        }
    }

    /// `y = f16(y * v)` element-wise (`ggml_vec_scale_f16`).
    pub fn scale_f16(&self, y: &mut [u16], v: f32) {
        match self.level {
            SimdLevel::Scalar => f16_vec::scale(y, v),
            // SAFETY: as in `dot_f16`.
            _ => unsafe { f16_vec::avx2::scale(y, v) },
        }
    }

    /// Rounds an f32 row to f16 (nearest even).
    pub fn f32_to_f16_row(&self, out: &mut [u16], x: &[f32]) {
        match self.level {
            SimdLevel::Scalar => f16_vec::from_f32(out, x),
            // SAFETY: as in `dot_f16`.
            _ => unsafe { f16_vec::avx2::from_f32(out, x) },
        }
    }

    /// Converts one activation row to `act` (the `act_type()` of the weights it
    /// will meet). `dst.len()` must be `act.row_bytes(src.len())`.
    pub fn quantize_row(&self, act: GgmlType, src: &[f32], dst: &mut [u8]) {
        let bytes = act.row_bytes(src.len());
        assert_eq!(
            Some(dst.len()),
            bytes,
            "quantize_row: {} bytes for {} values of {}",
            dst.len(),
            src.len(),
            act.name()
        );
        let simd_done = match (self.level, act) {
            (SimdLevel::Scalar, _) => false,
            // SAFETY: a non-scalar level is only constructed when the CPU and OS support AVX2, FMA and F16C.
            _ => unsafe { avx2::quantize_row(act, src, dst) },
        };
        if !simd_done {
            scalar::quantize_row(act, src, dst);
        }
    }

    /// `out[r]` = dot(weight row `r`, activation) for the `out.len()` rows of
    /// `n` values of type `ty` in `rows`; `act` is one row of `ty.act_type()`.
    pub fn matvec(&self, ty: GgmlType, n: usize, rows: &[u8], act: &[u8], out: &mut [f32]) {
        self.matvec_then(ty, n, rows, 0, act, out);
    }

    /// [`Kernels::matvec`] where the caller goes on with the `then` rows that
    /// follow `rows` in memory: they are prefetched like the rows of this call,
    /// so the stream of weights from memory does not restart between calls.
    pub fn matvec_then(
        &self,
        ty: GgmlType,
        n: usize,
        rows: &[u8],
        then: usize,
        act: &[u8],
        out: &mut [f32],
    ) {
        let rows_len = row_bytes_checked(ty, n).checked_mul(out.len());
        assert_eq!(
            Some(rows.len()),
            rows_len,
            "matvec: weight bytes don't match {} rows",
            out.len()
        );
        let mut shape = MatmulShape::new(ty, n, rows, act, 1, out.len(), out.len());
        shape.prefetch_rows = shape.nrows.saturating_add(then);
        shape.dispatch(self.level, rows, act, out);
    }

    /// `out[c * out_stride + r]` = dot(weight row `r`, activation row `c`) for the
    /// `ncols` activation rows concatenated in `acts` and all weight rows in `rows`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        ty: GgmlType,
        n: usize,
        rows: &[u8],
        acts: &[u8],
        ncols: usize,
        out: &mut [f32],
        out_stride: usize,
    ) {
        MatmulShape::new(ty, n, rows, acts, ncols, out.len(), out_stride)
            .dispatch(self.level, rows, acts, out);
    }
}

/// How many tiles of rows ahead a matvec prefetches its weights.
const MATVEC_PREFETCH_TILES: usize = 2;

/// Prefetches, while a matvec tile computes step `step` of its rows (block
/// `step` of each row), what the same step of the tile `ahead` bytes further on
/// will read (nothing if `ahead` is 0).
///
/// A matvec tile's rows are consecutive in memory, so a tile is one span of
/// bytes, read `step_bytes` (one block of each row) per step; this prefetches
/// the `step`-th `step_bytes` of the later tile's span. Over the tile that is
/// one linear sweep of the next tiles, each line prefetched once, spread
/// evenly over the computation. Without it a tile of interleaved rows waits on
/// memory: the hardware prefetchers follow such access patterns poorly, and
/// never across a 4 KiB page; prefetching the rows' blocks one by one instead
/// (several streams, some lines twice) reached only two thirds of the speed.
#[inline(always)]
fn prefetch_step(w0: *const u8, step: usize, step_bytes: usize, ahead: usize) {
    if ahead == 0 {
        return;
    }
    let p = w0.wrapping_add(ahead + step * step_bytes);
    let misalign = p as usize % 64;
    prefetch_lines(p.wrapping_sub(misalign), step_bytes + misalign);
}

/// Prefetches the cache lines of the `len` bytes at `p` (any address: a
/// prefetch never faults and reads nothing into the program).
#[inline(always)]
fn prefetch_lines(p: *const u8, len: usize) {
    use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let mut line = 0;
    while line < len {
        // SAFETY: see above; `wrapping_add` because the address may be past any allocation.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line).cast()) };
        line += 64;
    }
}

/// `ty.row_bytes(n)`, panicking with a clear message when `n` doesn't fit the type.
fn row_bytes_checked(ty: GgmlType, n: usize) -> usize {
    match ty.row_bytes(n) {
        Some(bytes) => bytes,
        None => panic!(
            "row length {n} is not a multiple of the {} block length",
            ty.name()
        ),
    }
}

/// Dot products of a tile of `R` weight rows by `C` activation rows.
///
/// Implementations may only be reachable through a [`Kernels`] whose level the
/// CPU supports; that is what makes their `tile` safe to call.
/// Which of llama.cpp's CPU matmul paths a K-quant dot product follows: the
/// integer sums are the same in all, the float roundings differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KPath {
    /// Single activation rows: `vec_dot`, or for Q4_K (repacked on AVX2) its
    /// GEMV, which applies the scales once per 256-value block.
    Single,
    /// Q4_K activation rows in groups of four: the repacked GEMM, which
    /// applies the scales once per 64 values.
    Gemm4,
    /// Q6_K with 8 or more activation rows: the tiled K-quant matmul, which
    /// scales each block's integer sum by the weight scale, then by the
    /// activation scale in an FMA.
    Tiled,
}

trait TileKernels {
    /// `w[r]` is one weight row of `n` values of `ty`, `a[c]` one activation row
    /// of `ty.act_type()` (lengths already checked); returns `[r][c]` dot products.
    /// With `ahead` > 0, the `R` rows are consecutive in memory (a matvec tile)
    /// and the kernel prefetches the weights that many bytes beyond the blocks it
    /// reads (see [`prefetch_step`]).
    fn tile<const R: usize, const C: usize>(
        ty: GgmlType,
        n: usize,
        w: [&[u8]; R],
        a: [&[u8]; C],
        kpath: KPath,
        ahead: usize,
    ) -> [[f32; C]; R];

    /// Rows per matvec tile for `ty` (4 or 8): more rows share the per-block
    /// activation work, as long as the accumulators fit in registers.
    fn matvec_rows(_ty: GgmlType) -> usize {
        4
    }

    /// Whether matmul tiles for `ty` may be 4 rows by 4 columns instead of 2 by 4
    /// (only where 16 accumulators and their operands fit in registers).
    fn wide_matmul_tiles(_ty: GgmlType) -> bool {
        false
    }
}

/// A checked matmul problem: the sizes of everything, validated once.
struct MatmulShape {
    ty: GgmlType,
    n: usize,
    nrows: usize,
    ncols: usize,
    row_bytes: usize,
    act_bytes: usize,
    out_stride: usize,
    /// Q4_K columns (from 0) computed as llama.cpp's GEMM computes them ([`KPath`]).
    gemm_cols: usize,
    /// Rows from the first one that a matvec may prefetch: its own and the
    /// ones its caller reads next ([`Kernels::matvec_then`]).
    prefetch_rows: usize,
}

impl MatmulShape {
    fn new(
        ty: GgmlType,
        n: usize,
        rows: &[u8],
        acts: &[u8],
        ncols: usize,
        out_len: usize,
        out_stride: usize,
    ) -> Self {
        let (row_bytes, act_bytes) = (
            row_bytes_checked(ty, n),
            row_bytes_checked(ty.act_type(), n),
        );
        assert!(row_bytes > 0, "matmul: rows of 0 values");
        assert_eq!(
            rows.len() % row_bytes,
            0,
            "matmul: weight bytes are not a whole number of rows"
        );
        let nrows = rows.len() / row_bytes;
        assert_eq!(
            Some(acts.len()),
            act_bytes.checked_mul(ncols),
            "matmul: activation bytes don't match {ncols} rows"
        );
        if ncols > 0 && nrows > 0 {
            assert!(
                nrows <= out_stride,
                "matmul: output stride {out_stride} is less than {nrows} rows"
            );
            let needed = (ncols - 1)
                .checked_mul(out_stride)
                .and_then(|x| x.checked_add(nrows));
            assert!(
                needed.is_some_and(|needed| needed <= out_len),
                "matmul: output slice too short"
            );
        }
        MatmulShape {
            ty,
            n,
            nrows,
            ncols,
            row_bytes,
            act_bytes,
            out_stride,
            gemm_cols: if ncols > 3 { ncols - ncols % 4 } else { 0 },
            prefetch_rows: nrows,
        }
    }

    fn dispatch(&self, level: SimdLevel, rows: &[u8], acts: &[u8], out: &mut [f32]) {
        match level {
            SimdLevel::Scalar => self.run::<scalar::Tiles, 1, 1>(rows, acts, out),
            // Q4_K's GEMM path gathers four rows' sums into one vector per step.
            SimdLevel::Avx2 if self.ty == GgmlType::Q4_K && self.gemm_cols > 0 => {
                self.run::<avx2::Tiles, 4, 2>(rows, acts, out)
            }
            // 32-value block types: unpacking a weight block (Q5_0's fifth bits
            // especially) costs more than a product, so it serves four columns.
            SimdLevel::Avx2
                if matches!(self.ty, GgmlType::Q5_0 | GgmlType::Q4_0 | GgmlType::Q8_0) =>
            {
                self.run::<avx2::Tiles, 2, 4>(rows, acts, out)
            }
            SimdLevel::Avx2 => self.run::<avx2::Tiles, 2, 2>(rows, acts, out),
            SimdLevel::Avx512 => self.run_avx512::<false>(rows, acts, out),
            SimdLevel::Avx512Vnni => self.run_avx512::<true>(rows, acts, out),
        }
    }

    /// The K-quant arithmetic of the tile of columns `c..c + width` (never
    /// split by `gemm_cols`: tiles are at most 4 wide and start at multiples of
    /// their width).
    fn k_path(&self, c: usize, width: usize) -> KPath {
        debug_assert!(c + width <= self.gemm_cols || c >= self.gemm_cols);
        match self.ty {
            GgmlType::Q4_K if c + width <= self.gemm_cols => KPath::Gemm4,
            GgmlType::Q6_K if self.ncols >= 8 => KPath::Tiled,
            _ => KPath::Single,
        }
    }

    fn row<'a>(&self, rows: &'a [u8], r: usize) -> &'a [u8] {
        &rows[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    fn act<'a>(&self, acts: &'a [u8], c: usize) -> &'a [u8] {
        &acts[c * self.act_bytes..(c + 1) * self.act_bytes]
    }

    /// Runs the matmul with tiles of `MR` rows by `MC` columns, falling back to
    /// narrower tiles at the edges. Columns are processed in groups whose
    /// activations fit in L2, so each weight row is loaded from memory once per
    /// group and reused from L1 for every column of the group.
    fn run<K: TileKernels, const MR: usize, const MC: usize>(
        &self,
        rows: &[u8],
        acts: &[u8],
        out: &mut [f32],
    ) {
        if self.ncols == 1 {
            return self.run_matvec::<K>(rows, acts, out);
        }
        let group = (ACT_TILE_BYTES / self.act_bytes).max(MC) / MC * MC;
        for c0 in (0..self.ncols).step_by(group) {
            let c_end = (c0 + group).min(self.ncols);
            let mut r = 0;
            while r + MR <= self.nrows {
                let w: [&[u8]; MR] = core::array::from_fn(|i| self.row(rows, r + i));
                self.cols::<K, MR, MC>(r, w, c0..c_end, acts, out);
                r += MR;
            }
            for r in r..self.nrows {
                self.cols::<K, 1, MC>(r, [self.row(rows, r)], c0..c_end, acts, out);
            }
        }
    }

    fn run_avx512<const VNNI: bool>(&self, rows: &[u8], acts: &[u8], out: &mut [f32]) {
        type K<const V: bool> = avx512::Tiles<V>;
        if K::<VNNI>::wide_matmul_tiles(self.ty) {
            self.run::<K<VNNI>, 4, 4>(rows, acts, out)
        } else {
            self.run::<K<VNNI>, 2, 4>(rows, acts, out)
        }
    }

    fn cols<K: TileKernels, const R: usize, const MC: usize>(
        &self,
        r0: usize,
        w: [&[u8]; R],
        cols: core::ops::Range<usize>,
        acts: &[u8],
        out: &mut [f32],
    ) {
        let mut c = cols.start;
        while c + MC <= cols.end {
            let a: [&[u8]; MC] = core::array::from_fn(|j| self.act(acts, c + j));
            let kpath = self.k_path(c, MC);
            self.store(
                K::tile::<R, MC>(self.ty, self.n, w, a, kpath, 0),
                r0,
                c,
                out,
            );
            c += MC;
        }
        for c in c..cols.end {
            self.store(
                K::tile::<R, 1>(
                    self.ty,
                    self.n,
                    w,
                    [self.act(acts, c)],
                    self.k_path(c, 1),
                    0,
                ),
                r0,
                c,
                out,
            );
        }
    }

    fn run_matvec<K: TileKernels>(&self, rows: &[u8], act: &[u8], out: &mut [f32]) {
        // The first tiles, which no earlier tile prefetched.
        let first = MATVEC_PREFETCH_TILES * K::matvec_rows(self.ty) * self.row_bytes;
        prefetch_lines(rows.as_ptr(), first.min(rows.len()));
        let mut r = 0;
        if K::matvec_rows(self.ty) == 8 {
            r = self.matvec_tiles::<K, 8>(r, rows, act, out);
        }
        r = self.matvec_tiles::<K, 4>(r, rows, act, out);
        self.matvec_tiles::<K, 1>(r, rows, act, out);
    }

    /// Rows from `r` on in tiles of `R` while whole tiles fit; returns the first row left.
    fn matvec_tiles<K: TileKernels, const R: usize>(
        &self,
        mut r: usize,
        rows: &[u8],
        act: &[u8],
        out: &mut [f32],
    ) -> usize {
        let a = [self.act(act, 0)];
        // The weights of a matvec come from memory, once: each tile prefetches
        // the tiles after it, unless they are past the rows this call and the
        // next of its caller read (another worker may be computing those).
        let ahead = MATVEC_PREFETCH_TILES * R * self.row_bytes;
        while r + R <= self.nrows {
            let w: [&[u8]; R] = core::array::from_fn(|i| self.row(rows, r + i));
            let more = r + (MATVEC_PREFETCH_TILES + 1) * R <= self.prefetch_rows;
            let ahead = if more { ahead } else { 0 };
            let tile = K::tile::<R, 1>(self.ty, self.n, w, a, KPath::Single, ahead);
            self.store(tile, r, 0, out);
            r += R;
        }
        r
    }

    fn store<const R: usize, const C: usize>(
        &self,
        dots: [[f32; C]; R],
        r0: usize,
        c0: usize,
        out: &mut [f32],
    ) {
        for (i, row) in dots.iter().enumerate() {
            for (j, &dot) in row.iter().enumerate() {
                out[(c0 + j) * self.out_stride + r0 + i] = dot;
            }
        }
    }
}
