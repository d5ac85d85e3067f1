//! Silero VAD v6 (16 kHz) evaluated directly: the same network as `silero_vad_16k_sequence.onnx`, with
//! weights read from that file, computed as a handful of dense matrix products.
//!
//! Why not only tract: tract runs this graph one window at a time inside each layer (a 258×256 by 256×5
//! product per window for the STFT, im2col copies for every 3-tap convolution, a generic `Scan` for the
//! LSTM), which spent most of its time outside arithmetic. Here a batch of S windows is one product per
//! layer, the frame the graph computes and discards is skipped, and convolution taps that only ever see
//! zero padding are dropped. The STFT layer's basis is a Hann-windowed DFT (checked at load), so it runs
//! as a 256-point real FFT per frame: 24 % less time per window than the `4S × 256` by `256 × 256`
//! product it replaces, which stays as the path for any other basis. Probabilities agree with tract to
//! about 1e-5 (`vad::tests::native_network_matches_tract_gated_and_ungated` checks 1e-4). It needs AVX-512F
//! or AVX2, with FMA (see `gemm`: both give the same bits); elsewhere the tract plans in `vad` run instead.
//!
//! The graph, per window of 576 samples `x` (64 context + 512 new):
//! - STFT: reflect-pad 128 each side, frames of 256 at hop 128 → 5 frames; frame 0 is discarded; each
//!   frame's 258 outputs are 129 real and 129 imaginary parts → magnitudes `[4][129]`.
//! - encoder: conv 129→128 (k3, pad 1) + ReLU → `[4][128]`; 128→64 (k3, stride 2) → `[2][64]`;
//!   64→64 (k3, stride 2) → `[1][64]`; 64→128 (k3) → `[1][128]`, each + ReLU.
//! - LSTM 128→128 over the windows in order (ONNX gate order i, o, f, c), state carried.
//! - ReLU, 1×1 conv 128→1, sigmoid.

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

use super::gemm::{Packed, gemm, gemv};

/// Samples per VAD window (the network's input) at 16 kHz (32 ms).
pub const WINDOW: usize = 512;
/// Context samples prepended to every window (the tail of the previous window).
pub const CONTEXT: usize = 64;

const INPUT: usize = WINDOW + CONTEXT;
const FFT: usize = 256;
const HOP: usize = 128;
const BINS: usize = 129;
/// Input samples smaller than this (−400 dBFS) are taken as 0, keeping subnormals out of the arithmetic.
const FLUSH_BELOW: f32 = 1e-20;
/// Kept STFT frames per window.
const FRAMES: usize = 4;
/// STFT output columns kept (see `from_onnx`).
const STFT_COLS: usize = 2 * BINS - 2;

/// Basis row of STFT column `o`.
fn stft_row(o: usize) -> usize {
    if o < BINS { o } else { o + 1 }
}
pub const HIDDEN: usize = 128;

/// The network's weights, packed for [`gemm`].
pub struct SileroNet {
    stft: Stft,
    enc0: Packed,
    enc1: Packed,
    enc2: Packed,
    enc3: Packed,
    lstm_in: Packed,
    /// Recurrent weights, `[128][512]` (`h` row times this = gate pre-activations).
    lstm_rec: Packed,
    out_w: Vec<f32>,
    out_b: f32,
}

impl std::fmt::Debug for SileroNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stft = match self.stft {
            Stft::Fft { .. } => "fft",
            Stft::Matrix(_) => "matrix",
        };
        f.debug_struct("SileroNet")
            .field("stft", &stft)
            .finish_non_exhaustive()
    }
}

/// How the STFT layer runs.
enum Stft {
    /// The basis is a windowed DFT (checked at load): window each frame and run a 256-point real FFT,
    /// about 1/10 of the arithmetic of the product.
    Fft {
        window: Vec<f32>,
        plan: Arc<dyn RealToComplex<f32>>,
    },
    /// Any other basis: the `4S × 256` by `256 × 256` product.
    Matrix(Packed),
}

/// If `basis` (`[258][256]`: 129 real rows, then 129 imaginary rows) is `w[n]·cos(2πkn/256)` and
/// `±w[n]·sin(2πkn/256)` for one window `w` (row 0, where cos = 1), that window.
fn dft_window(basis: &[f32]) -> Option<Vec<f32>> {
    let window = basis[..FFT].to_vec();
    let scale = window.iter().fold(0f32, |m, &v| m.max(v.abs()));
    if scale == 0.0 {
        return None;
    }
    let tol = 1e-5 * scale;
    for k in 0..BINS {
        let (re, im) = (&basis[k * FFT..][..FFT], &basis[(BINS + k) * FFT..][..FFT]);
        let cos_sin = |n: usize| {
            let phase = 2.0 * std::f64::consts::PI * ((k * n) % FFT) as f64 / FFT as f64;
            let (sin, cos) = phase.sin_cos();
            (window[n] * cos as f32, window[n] * sin as f32)
        };
        // The sign convention of the imaginary rows, from their correlation with the sine.
        let dot: f32 = (0..FFT).map(|n| im[n] * cos_sin(n).1).sum();
        let sign = if dot < 0.0 { -1.0 } else { 1.0 };
        for n in 0..FFT {
            let (c, si) = cos_sin(n);
            if (re[n] - c).abs() > tol || (im[n] - sign * si).abs() > tol {
                return None;
            }
        }
    }
    Some(window)
}

/// Reusable buffers for one stream (sized for the largest batch seen).
#[derive(Debug, Default)]
pub struct Scratch {
    frames: Vec<f32>,
    spectrum: Vec<Complex<f32>>,
    fft_scratch: Vec<Complex<f32>>,
    spec: Vec<f32>,
    a0: Vec<f32>,
    e0: Vec<f32>,
    a1: Vec<f32>,
    e1: Vec<f32>,
    e2: Vec<f32>,
    e3: Vec<f32>,
    gates_in: Vec<f32>,
    gates: Vec<f32>,
}

/// A named float tensor from the ONNX file.
struct Init {
    dims: Vec<usize>,
    data: Vec<f32>,
}

fn initializers(bytes: &[u8]) -> Result<std::collections::HashMap<String, Init>, String> {
    use tract_onnx::prelude::*;
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut std::io::Cursor::new(bytes))
        .map_err(|e| format!("{e:#}"))?;
    let graph = proto.graph.ok_or("model has no graph")?;
    let mut out = std::collections::HashMap::new();
    for t in graph.initializer {
        // FLOAT = 1 in ONNX's TensorProto.DataType.
        if t.data_type != 1 {
            continue;
        }
        let data: Vec<f32> = if !t.raw_data.is_empty() {
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        } else {
            t.float_data.clone()
        };
        let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        if dims.iter().product::<usize>() != data.len() {
            return Err(format!("initializer {} has a bad size", t.name));
        }
        out.insert(t.name.clone(), Init { dims, data });
    }
    Ok(out)
}

impl SileroNet {
    /// Read the weights from the ONNX model bytes. Refused on a CPU without a `gemm` vector kernel
    /// (AVX-512F or AVX2, with FMA): a `SileroNet` exists only where [`run`](Self::run) may execute it.
    pub fn from_onnx(onnx: &[u8]) -> Result<SileroNet, String> {
        SileroNet::build(onnx, true)
    }

    /// `fft`: run the STFT as an FFT when the basis allows it (tests turn it off to compare).
    fn build(onnx: &[u8], fft: bool) -> Result<SileroNet, String> {
        if !super::gemm::available() {
            return Err(
                "the native Silero network needs a CPU with AVX-512F or AVX2, and FMA".into(),
            );
        }
        let mut inits = initializers(onnx)?;
        let mut take = |name: &str, dims: &[usize]| -> Result<Vec<f32>, String> {
            let t = inits
                .remove(name)
                .ok_or_else(|| format!("initializer {name} missing"))?;
            if t.dims != dims {
                return Err(format!(
                    "initializer {name}: dims {:?}, expected {dims:?}",
                    t.dims
                ));
            }
            Ok(t.data)
        };
        let basis = take("stft.forward_basis_buffer", &[2 * BINS, 1, FFT])?;
        for zero_row in [BINS, 2 * BINS - 1] {
            if basis[zero_row * FFT..][..FFT].iter().any(|&v| v != 0.0) {
                return Err("STFT basis: imaginary rows of bins 0 and 128 are not zero".into());
            }
        }
        let w0 = take("encoder.0.weight", &[128, BINS, 3])?;
        let b0 = take("encoder.0.bias", &[128])?;
        let w1 = take("encoder.1.weight", &[64, 128, 3])?;
        let b1 = take("encoder.1.bias", &[64])?;
        let w2 = take("encoder.2.weight", &[64, 64, 3])?;
        let b2 = take("encoder.2.bias", &[64])?;
        let w3 = take("encoder.3.weight", &[128, 64, 3])?;
        let b3 = take("encoder.3.bias", &[128])?;
        let wo = take("output.weight", &[1, HIDDEN, 1])?;
        let bo = take("output.bias", &[1])?;
        let wi = take("onnx::LSTM_209", &[1, 4 * HIDDEN, HIDDEN])?;
        let wr = take("onnx::LSTM_210", &[1, 4 * HIDDEN, HIDDEN])?;
        let bl = take("onnx::LSTM_211", &[1, 8 * HIDDEN])?;
        let lstm_bias: Vec<f32> = (0..4 * HIDDEN)
            .map(|g| bl[g] + bl[4 * HIDDEN + g])
            .collect();
        let stft = match dft_window(&basis).filter(|_| fft) {
            Some(window) => Stft::Fft {
                window,
                plan: RealFftPlanner::<f32>::new().plan_fft_forward(FFT),
            },
            // Columns: the 129 real parts, then the imaginary parts of bins 1..=127 (those of bin 0 and
            // bin 128 are sines at 0 and π: all-zero rows, checked above). 256 columns, no padding.
            None => Stft::Matrix(Packed::new(
                FFT,
                STFT_COLS,
                |r, o| basis[stft_row(o) * FFT + r],
                None,
            )),
        };
        Ok(SileroNet {
            stft,
            enc0: Packed::new(3 * BINS, 128, conv(&w0, BINS, 0), Some(&b0)),
            enc1: Packed::new(3 * 128, 64, conv(&w1, 128, 0), Some(&b1)),
            // One output frame from two input frames: tap 0 only ever sees the padding.
            enc2: Packed::new(2 * 64, 64, conv(&w2, 64, 1), Some(&b2)),
            // One frame in, one out: only the centre tap sees data.
            enc3: Packed::new(64, 128, conv(&w3, 64, 1), Some(&b3)),
            lstm_in: Packed::new(
                HIDDEN,
                4 * HIDDEN,
                |r, g| wi[g * HIDDEN + r],
                Some(&lstm_bias),
            ),
            lstm_rec: Packed::new(HIDDEN, 4 * HIDDEN, |r, g| wr[g * HIDDEN + r], None),
            out_w: wo,
            out_b: bo[0],
        })
    }

    /// Run `windows.len() / 576` windows (each 64 context + 512 samples) in order, carrying `h` and `c`.
    /// One probability per window is appended to `probs`.
    pub fn run(
        &self,
        windows: &[f32],
        h: &mut [f32; HIDDEN],
        c: &mut [f32; HIDDEN],
        s: &mut Scratch,
        probs: &mut Vec<f32>,
    ) {
        let n = windows.len() / INPUT;
        if n == 0 {
            return;
        }
        let nf = n * FRAMES;
        // STFT frames: frame k (1..=4) of the padded window starts at input sample 128·(k−1); the last
        // 64 samples of frame 4 are the reflection of the window's end.
        s.frames.resize(nf * FFT, 0.0);
        for (w, x) in windows.chunks_exact(INPUT).enumerate() {
            for k in 0..FRAMES {
                let dst = &mut s.frames[(w * FRAMES + k) * FFT..][..FFT];
                let start = k * HOP;
                let real = (INPUT - start).min(FFT);
                dst[..real].copy_from_slice(&x[start..start + real]);
                for (j, d) in dst[real..].iter_mut().enumerate() {
                    *d = x[INPUT - 2 - j];
                }
                // Subnormal samples (the tail of a decoder's filter decaying in digital silence) make
                // every float operation on them ~30x slower and carry nothing at this scale: zero them.
                for d in dst.iter_mut() {
                    if d.abs() < FLUSH_BELOW {
                        *d = 0.0;
                    }
                }
            }
        }
        // Magnitudes straight into the first encoder's im2col rows: row (w, t) = [m(t−1) | m(t) | m(t+1)].
        let k0 = 3 * BINS;
        s.a0.clear();
        s.a0.resize(nf * k0, 0.0);
        let scatter = |a0: &mut [f32], f: usize, b: usize, m: f32| {
            // As tap 1 of frame t, tap 2 of frame t−1, tap 0 of frame t+1 (same window only).
            let t = f % FRAMES;
            a0[f * k0 + BINS + b] = m;
            if t > 0 {
                a0[(f - 1) * k0 + 2 * BINS + b] = m;
            }
            if t + 1 < FRAMES {
                a0[(f + 1) * k0 + b] = m;
            }
        };
        match &self.stft {
            Stft::Fft { window, plan } => {
                s.spectrum.resize(BINS, Complex::default());
                s.fft_scratch
                    .resize(plan.get_scratch_len(), Complex::default());
                for f in 0..nf {
                    let frame = &mut s.frames[f * FFT..][..FFT];
                    for (x, w) in frame.iter_mut().zip(window) {
                        *x *= w;
                    }
                    // Lengths are the plan's own (FFT in, BINS out, its scratch length): it cannot fail.
                    if plan
                        .process_with_scratch(frame, &mut s.spectrum, &mut s.fft_scratch)
                        .is_err()
                    {
                        unreachable!("FFT buffers sized by the plan");
                    }
                    // `norm_sqr().sqrt()`, not `norm()`: libm's `hypotf` guards against overflow that
                    // audio magnitudes cannot reach, and cost 2.7 % of the offline pipeline.
                    for (b, z) in s.spectrum.iter().enumerate() {
                        scatter(&mut s.a0, f, b, z.norm_sqr().sqrt());
                    }
                }
            }
            Stft::Matrix(stft) => {
                s.spec.resize(nf * stft.ld, 0.0);
                gemm(&s.frames, FFT, nf, stft, &mut s.spec, stft.ld, false);
                for f in 0..nf {
                    let row = &s.spec[f * stft.ld..][..STFT_COLS];
                    for b in 0..BINS {
                        let im = if b == 0 || b == BINS - 1 {
                            0.0
                        } else {
                            row[BINS + b - 1]
                        };
                        scatter(&mut s.a0, f, b, (row[b] * row[b] + im * im).sqrt());
                    }
                }
            }
        }
        s.e0.resize(nf * self.enc0.ld, 0.0);
        gemm(&s.a0, k0, nf, &self.enc0, &mut s.e0, self.enc0.ld, true);
        // encoder.1, stride 2: output 0 sees frames (pad, 0, 1), output 1 sees frames (1, 2, 3).
        let (c0, l0) = (128, self.enc0.ld);
        let k1 = 3 * c0;
        s.a1.clear();
        s.a1.resize(2 * n * k1, 0.0);
        for w in 0..n {
            let e = |t: usize| &s.e0[(w * FRAMES + t) * l0..][..c0];
            let r0 = &mut s.a1[2 * w * k1..][..k1];
            r0[c0..2 * c0].copy_from_slice(e(0));
            r0[2 * c0..].copy_from_slice(e(1));
            let r1 = &mut s.a1[(2 * w + 1) * k1..][..k1];
            r1[..c0].copy_from_slice(e(1));
            r1[c0..2 * c0].copy_from_slice(e(2));
            r1[2 * c0..].copy_from_slice(e(3));
        }
        s.e1.resize(2 * n * self.enc1.ld, 0.0);
        gemm(&s.a1, k1, 2 * n, &self.enc1, &mut s.e1, self.enc1.ld, true);
        // encoder.2 (stride 2, one output from frames (pad, 0, 1)): with ld == 64 the two frames of a
        // window are already adjacent, so e1 is its im2col matrix as is.
        debug_assert_eq!(self.enc1.ld, 64);
        s.e2.resize(n * self.enc2.ld, 0.0);
        gemm(&s.e1, 128, n, &self.enc2, &mut s.e2, self.enc2.ld, true);
        s.e3.resize(n * self.enc3.ld, 0.0);
        gemm(
            &s.e2,
            self.enc2.ld,
            n,
            &self.enc3,
            &mut s.e3,
            self.enc3.ld,
            true,
        );
        let lg = self.lstm_in.ld;
        s.gates_in.resize(n * lg, 0.0);
        gemm(
            &s.e3,
            self.enc3.ld,
            n,
            &self.lstm_in,
            &mut s.gates_in,
            lg,
            false,
        );
        s.gates.resize(lg, 0.0);
        for w in 0..n {
            gemv(&h[..], &self.lstm_rec, &mut s.gates);
            let pre = &s.gates_in[w * lg..][..4 * HIDDEN];
            lstm_cell(&s.gates[..4 * HIDDEN], pre, h, c);
            let logit = h
                .iter()
                .zip(&self.out_w)
                .fold(self.out_b, |acc, (&h, &w)| h.max(0.0).mul_add(w, acc));
            probs.push(sigmoid(logit));
        }
    }
}

/// One LSTM step (ONNX gate order i, o, f, c), compiled for the CPU's vector kernel. The arithmetic is
/// the same plain float operations in the same order whichever it is (Rust never fuses a multiply and
/// an add on its own), so the two builds give the same bits.
fn lstm_cell(rec: &[f32], pre: &[f32], h: &mut [f32; HIDDEN], c: &mut [f32; HIDDEN]) {
    #[cfg(target_arch = "x86_64")]
    match super::gemm::kernel() {
        // SAFETY: `kernel` checked that the CPU has AVX-512F and FMA, all the function requires.
        Some(super::gemm::Kernel::Avx512) => return unsafe { lstm_cell_avx512(rec, pre, h, c) },
        // SAFETY: `kernel` checked that the CPU has AVX2 and FMA, all the function requires.
        Some(super::gemm::Kernel::Avx2) => return unsafe { lstm_cell_avx2(rec, pre, h, c) },
        None => {}
    }
    lstm_cell_body(rec, pre, h, c);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn lstm_cell_avx512(rec: &[f32], pre: &[f32], h: &mut [f32; HIDDEN], c: &mut [f32; HIDDEN]) {
    lstm_cell_body(rec, pre, h, c);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn lstm_cell_avx2(rec: &[f32], pre: &[f32], h: &mut [f32; HIDDEN], c: &mut [f32; HIDDEN]) {
    lstm_cell_body(rec, pre, h, c);
}

#[inline(always)]
fn lstm_cell_body(rec: &[f32], pre: &[f32], h: &mut [f32; HIDDEN], c: &mut [f32; HIDDEN]) {
    let (ri, rest) = rec.split_at(HIDDEN);
    let (ro, rest) = rest.split_at(HIDDEN);
    let (rf, rc) = rest.split_at(HIDDEN);
    let (pi, rest) = pre.split_at(HIDDEN);
    let (po, rest) = rest.split_at(HIDDEN);
    let (pf, pc) = rest.split_at(HIDDEN);
    for j in 0..HIDDEN {
        let i = sigmoid_fast(ri[j] + pi[j]);
        let o = sigmoid_fast(ro[j] + po[j]);
        let f = sigmoid_fast(rf[j] + pf[j]);
        let g = tanh_fast(rc[j] + pc[j]);
        c[j] = f * c[j] + i * g;
        h[j] = o * tanh_fast(c[j]);
    }
}

/// tanh as a 13/6 rational function on [−7.9, 7.9] (Eigen's float `ptanh`; error about 1e-7), written
/// without calls or branches so the LSTM loop vectorises.
#[inline(always)]
fn tanh_fast(x: f32) -> f32 {
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let p = ((((((-2.760_768_5e-16 * x2 + 2.000_188e-13) * x2 - 8.604_672e-11) * x2
        + 5.122_297e-8)
        * x2
        + 1.485_722_4e-5)
        * x2
        + 6.372_619_3e-4)
        * x2
        + 4.893_524_6e-3)
        * x;
    let q = ((1.198_258_4e-6 * x2 + 1.185_347_1e-4) * x2 + 2.268_434_6e-3) * x2 + 4.893_525e-3;
    p / q
}

#[inline(always)]
fn sigmoid_fast(x: f32) -> f32 {
    0.5 + 0.5 * tanh_fast(0.5 * x)
}

/// Conv weight `[out][in][tap]` as an im2col matrix: rows ordered (tap, in) for taps `first..`.
fn conv(w: &[f32], cin: usize, first: usize) -> impl Fn(usize, usize) -> f32 + '_ {
    move |r, o| {
        let (d, i) = (first + r / cin, r % cin);
        w[(o * cin + i) * 3 + d]
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::vad::MODEL_BYTES;

    fn windows(n: usize) -> Vec<f32> {
        let mut seed = 0x9e37_79b9u32;
        (0..n * INPUT)
            .map(|i| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let t = i as f32 / 16_000.0;
                0.3 * (t * 2.0 * std::f32::consts::PI * (200.0 + 80.0 * (t * 2.0).sin())).sin()
                    + (seed as f32 / u32::MAX as f32 - 0.5) * 0.02
            })
            .collect()
    }

    #[cfg_attr(
        not(host_native_vad),
        ignore = "needs a CPU with AVX-512F or AVX2, and FMA (the native Silero network)"
    )]
    #[test]
    fn the_model_stft_is_a_windowed_dft_and_runs_as_an_fft() {
        let net = SileroNet::from_onnx(MODEL_BYTES).unwrap();
        assert!(matches!(net.stft, Stft::Fft { .. }), "{net:?}");
    }

    #[test]
    fn a_basis_that_is_not_a_dft_is_refused() {
        // A window but no DFT rows: only row 0 (the window itself) is set.
        let mut basis = vec![0.0; 2 * BINS * FFT];
        basis[..FFT].fill(1.0);
        assert!(dft_window(&basis).is_none());
        assert!(dft_window(&vec![0.0; 2 * BINS * FFT]).is_none());
    }

    #[test]
    fn the_network_is_refused_on_a_cpu_without_a_vector_kernel() {
        let net = SileroNet::from_onnx(MODEL_BYTES);
        assert_eq!(net.is_ok(), crate::audio::gemm::available());
    }

    #[cfg_attr(
        not(host_native_vad),
        ignore = "needs a CPU with AVX-512F or AVX2, and FMA (the native Silero network)"
    )]
    #[test]
    fn subnormal_samples_count_as_zero() {
        let net = SileroNet::from_onnx(MODEL_BYTES).unwrap();
        let run = |x: &[f32]| {
            let (mut h, mut c, mut s, mut p) =
                ([0.0; HIDDEN], [0.0; HIDDEN], Scratch::default(), vec![]);
            net.run(x, &mut h, &mut c, &mut s, &mut p);
            p
        };
        let tiny: Vec<f32> = (0..4 * INPUT)
            .map(|i| if i % 2 == 0 { 1e-39 } else { -3e-40 })
            .collect();
        assert_eq!(run(&tiny), run(&vec![0.0; 4 * INPUT]));
    }

    #[cfg_attr(
        not(host_native_vad),
        ignore = "needs a CPU with AVX-512F or AVX2, and FMA (the native Silero network)"
    )]
    #[test]
    fn fft_and_matrix_stft_give_the_same_probabilities() {
        let fft = SileroNet::build(MODEL_BYTES, true).unwrap();
        let matrix = SileroNet::build(MODEL_BYTES, false).unwrap();
        assert!(matches!(matrix.stft, Stft::Matrix(_)));
        let x = windows(40);
        let run = |net: &SileroNet| {
            let (mut h, mut c, mut s, mut p) =
                ([0.0; HIDDEN], [0.0; HIDDEN], Scratch::default(), vec![]);
            for batch in x.chunks(7 * INPUT) {
                net.run(batch, &mut h, &mut c, &mut s, &mut p);
            }
            p
        };
        let (a, b) = (run(&fft), run(&matrix));
        assert_eq!(a.len(), 40);
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-4, "max |fft - matrix| = {worst}");
        assert!(
            a.iter().any(|&p| p > 0.01),
            "probabilities all ~0: the test signal tests nothing"
        );
    }
}
