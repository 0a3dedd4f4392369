//! Times the quantized matmul kernels on a real model's weight matrices.
//!
//!     cargo run --release -p aivmm-engine --features std --example kernel_bench -- MODEL.gguf [BATCH]
//!
//! For every kind of matrix (attn_q, ffn_down, output, ...) and weight type, it
//! runs the matrices of all layers one after another, as a forward pass does
//! (so the weights come from memory, not from the cache), with one activation
//! (generation: reports GB/s of weights streamed) and with BATCH activations
//! (prompt processing: reports GMAC/s), on one thread through `Kernels`
//! directly, timed in CPU time; "L2 GB/s" is the matvec speed on a
//! slice of one matrix that stays in L2 (the kernel's compute limit). Finally it times `Session::forward` on one token and on BATCH
//! tokens with 1 and 2 workers (wall time). `KERNEL_BENCH_ONLY=output,ffn_up` times only those
//! matrices.

use std::collections::BTreeMap;
use std::time::Instant;

use aivmm_engine::gguf::Gguf;
use aivmm_engine::host_pool::ThreadPool;
use aivmm_engine::model::weights::Matrix;
use aivmm_engine::model::{Model, Session, SessionLimits};
use aivmm_engine::parallel::Parallel;
use aivmm_engine::quant::{Kernels, SimdLevel};

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: kernel_bench MODEL.gguf [BATCH]")?;
    let batch: usize = match args.next() {
        Some(b) => b.parse().map_err(|e| format!("BATCH {b:?}: {e}"))?,
        None => 32,
    };
    let bytes = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
    let gguf = Gguf::parse(&bytes).map_err(|e| format!("{path}: {e}"))?;
    let model = Model::load(&gguf).map_err(|e| format!("{path}: {e}"))?;
    let kernels = Kernels::detect();
    println!("{} ({:?})", model.name, kernels.level());

    let mut groups: BTreeMap<(&str, &str), Vec<Matrix<'_>>> = BTreeMap::new();
    for layer in &model.weights.layers {
        for (name, m) in [
            ("attn_q", layer.wq),
            ("attn_k", layer.wk),
            ("attn_v", layer.wv),
            ("attn_output", layer.wo),
            ("ffn_gate", layer.ffn_gate),
            ("ffn_up", layer.ffn_up),
            ("ffn_down", layer.ffn_down),
        ] {
            groups.entry((name, m.ty.name())).or_default().push(m);
        }
    }
    let output = model.weights.output;
    groups.insert(("output", output.ty.name()), vec![output]);

    let words: Vec<u64> = output
        .data
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let mut xor = 0;
    let read = best_of(5, || {
        xor ^= words.iter().fold(0u64, |a, &w| a ^ w);
    });
    let hot_words = &words[..96 * 1024];
    let hot_read = best_of(20, || {
        for _ in 0..10 {
            xor ^= core::hint::black_box(hot_words)
                .iter()
                .fold(0u64, |a, &w| a ^ w);
        }
    }) / 10.0;
    println!(
        "plain read of {} MB: {:.2} GB/s; of 768 KiB (in L2): {:.2} GB/s (checksum {xor:x})",
        words.len() * 8 / 1_000_000,
        (words.len() * 8) as f64 / read / 1e9,
        (hot_words.len() * 8) as f64 / hot_read / 1e9,
    );
    println!(
        "{:<12} {:<5} {:>4} {:>11} {:>9} {:>8} {:>8} {:>10} {:>8}",
        "matrix", "type", "n", "rows x cols", "mv ms", "mv GB/s", "L2 GB/s", "mm ms/tok", "GMAC/s"
    );
    let (mut total_mv, mut total_mm) = (0.0, 0.0);
    // KERNEL_BENCH_ONLY=ffn_up,output limits the table (and skips the forward timings).
    let only = std::env::var("KERNEL_BENCH_ONLY").ok();
    // KERNEL_BENCH_HOT_REPS=1000 repeats the in-L2 runs (for profiling the kernels).
    let hot_reps: usize = match std::env::var("KERNEL_BENCH_HOT_REPS") {
        Ok(v) => v
            .parse()
            .map_err(|e| format!("KERNEL_BENCH_HOT_REPS {v:?}: {e}"))?,
        Err(_) => 20,
    };
    for ((name, ty), mats) in &groups {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|o| o == *name))
        {
            continue;
        }
        let m0 = mats[0];
        let act_ty = m0.ty.act_type();
        let act_row = act_ty.row_bytes(m0.cols).ok_or("bad row length")?;
        let x: Vec<f32> = (0..m0.cols * batch)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let mut act = vec![0u8; act_row * batch];
        for t in 0..batch {
            kernels.quantize_row(
                act_ty,
                &x[t * m0.cols..(t + 1) * m0.cols],
                &mut act[t * act_row..(t + 1) * act_row],
            );
        }
        let mut out = vec![0.0f32; m0.rows * batch];
        let bytes: usize = mats.iter().map(|m| m.data.len()).sum();
        let macs: usize = mats.iter().map(|m| m.rows * m.cols).sum();

        let mv = best_of(if *name == "output" { 5 } else { 20 }, || {
            for m in mats {
                kernels.matvec(m.ty, m.cols, m.data, &act[..act_row], &mut out[..m.rows]);
            }
        });
        // The first rows of one matrix, few enough to stay in L2: the kernel's compute speed.
        let hot_rows = (768 * 1024 / m0.row_bytes()).clamp(1, m0.rows);
        let hot = &m0.data[..hot_rows * m0.row_bytes()];
        let hot_mv = best_of(hot_reps, || {
            for _ in 0..10 {
                kernels.matvec(m0.ty, m0.cols, hot, &act[..act_row], &mut out[..hot_rows]);
            }
        }) / 10.0;
        // The yardstick uses VNNI: only where the CPU has it.
        if m0.ty == aivmm_engine::quant::GgmlType::Q8_0 && kernels.level() >= SimdLevel::Avx512Vnni
        {
            let nb = m0.cols / 32;
            let rb = m0.row_bytes();
            let simple = best_of(hot_reps, || {
                for _ in 0..10 {
                    for r in 0..hot_rows {
                        // SAFETY: the CPU has these features (level Avx512Vnni checked above).
                        out[r] = unsafe {
                            simple_q8_0_row(&hot[r * rb..(r + 1) * rb], &act[..act_row], nb)
                        };
                    }
                }
            }) / 10.0;
            println!(
                "  simple one-row Q8_0 kernel in L2: {:.2} GB/s",
                hot.len() as f64 / simple / 1e9
            );
        }
        let mm = best_of(3, || {
            for m in mats {
                kernels.matmul(m.ty, m.cols, m.data, &act, batch, &mut out, m.rows);
            }
        });
        total_mv += mv;
        total_mm += mm / batch as f64;
        println!(
            "{:<12} {:<5} {:>4} {:>5}x{:<5} {:>9.3} {:>8.2} {:>8.2} {:>10.3} {:>8.2}",
            name,
            ty,
            mats.len(),
            m0.rows,
            m0.cols,
            mv * 1e3,
            bytes as f64 / mv / 1e9,
            hot.len() as f64 / hot_mv / 1e9,
            mm * 1e3 / batch as f64,
            (macs * batch) as f64 / mm / 1e9,
        );
    }
    println!(
        "all matrices: {:.3} ms per token as matvecs, {:.3} ms per token in batches of {batch}",
        total_mv * 1e3,
        total_mm * 1e3
    );

    if only.is_some() {
        return Ok(());
    }
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads).map_err(|e| e.to_string())?;
        let limits = SessionLimits {
            n_ctx: 512,
            max_batch: batch,
            max_workers: threads,
        };
        let mut session = Session::new(&model, limits, kernels);
        let prompt: Vec<u32> = (0..batch as u32).map(|i| 100 + i * 37).collect();
        let prefill = best_wall(3, || {
            session.truncate(0);
            let _ = session.forward(&model, &prompt, &pool);
        });
        let one = best_wall(20, || {
            session.truncate(batch);
            let _ = session.forward(&model, &[1234], &pool);
        });
        println!(
            "forward, {} worker(s): {:.2} ms per token ({:.1} tok/s); {batch}-token batch {:.1} ms ({:.1} tok/s)",
            pool.n_workers(),
            one * 1e3,
            1.0 / one,
            prefill * 1e3,
            batch as f64 / prefill
        );
    }
    Ok(())
}

/// The shortest of `reps` timed runs of `f`, in seconds of this thread's CPU
/// time (after one warm-up run): steadier than wall time on a machine shared
/// with other work.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let start = thread_cpu_seconds();
            f();
            thread_cpu_seconds() - start
        })
        .fold(f64::INFINITY, f64::min)
}

/// The shortest of `reps` wall-clock timed runs of `f`, in seconds (after one warm-up run).
fn best_wall(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// A plain one-row Q8_0 x Q8_0 dot product (one ymm per block, a scalar scale per block):
/// the simplest possible kernel, as a yardstick for the engine's.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn simple_q8_0_row(w: &[u8], a: &[u8], nb: usize) -> f32 {
    use core::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let wb = &w[b * 34..b * 34 + 34];
        let ab = &a[b * 34..b * 34 + 34];
        let d = aivmm_engine::quant::f16_to_f32(u16::from_le_bytes([wb[0], wb[1]]))
            * aivmm_engine::quant::f16_to_f32(u16::from_le_bytes([ab[0], ab[1]]));
        // SAFETY: both slices hold 32 bytes after the scale.
        let (x, y) = unsafe {
            (
                _mm256_loadu_si256(wb.as_ptr().add(2).cast()),
                _mm256_loadu_si256(ab.as_ptr().add(2).cast()),
            )
        };
        let dot = _mm256_dpbusd_epi32(
            _mm256_setzero_si256(),
            _mm256_sign_epi8(x, x),
            _mm256_sign_epi8(y, x),
        );
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d), acc);
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    lanes.iter().sum()
}
