//! Silero VAD (v6, 16 kHz) run in-process, with carried state and batched windows.
//!
//! The model is `silero_vad_16k_sequence.onnx` from the `silero-vad` 6.2.3 PyPI package (MIT, see
//! `engine/models/`): input `[S, 576]` = S consecutive windows of 64 context + 512 new samples, LSTM
//! state `h`, `c` `[1, 1, 128]` carried across calls. On CPUs with AVX-512F or AVX2, and FMA, the network is
//! evaluated by the crate-private `audio::silero_net` (same weights, read from the file; about twice as
//! fast on AVX-512); elsewhere by `tract-onnx`. One call over S windows costs far less than S calls over one, so a stream
//! runs full batches of [`BATCH`] windows and only runs smaller batches when asked to flush (end of file,
//! or a live session that wants its latest windows now).
//!
//! A cheap energy pre-gate skips windows that are certainly silence (RMS below the gate): they get
//! probability 0 and do not advance the LSTM state, so the model sees the sequence of speech-bearing
//! windows only. Windows are copied into the batch as they complete, so gated windows between them do
//! not split batches: a batch is always [`BATCH`] model windows, however the gate fragments the stream.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use tract_onnx::prelude::*;

pub use super::silero_net::{CONTEXT, WINDOW};
use super::silero_net::{HIDDEN, Scratch, SileroNet};

/// Windows per full batch (about one second of audio).
pub const BATCH: usize = 32;
/// Batch sizes with a compiled tract plan, largest first. Every count of windows is a sum of these.
const PLAN_SIZES: [usize; 3] = [BATCH, 8, 1];
const STATE: usize = HIDDEN;
/// Windows whose result may wait for a batch to fill (gated ones queue behind a pending model window).
/// Past this the partial batch runs, so a long gated stretch never holds results back for long.
const MAX_QUEUED: usize = 4 * BATCH;
const INPUT: usize = WINDOW + CONTEXT;

pub(crate) static MODEL_BYTES: &[u8] = include_bytes!("../../models/silero_vad_16k_sequence.onnx");

/// Errors from loading or running the VAD model.
#[derive(Debug, thiserror::Error)]
pub enum VadError {
    #[error("VAD model failed to load: {0}")]
    Load(String),
    #[error("VAD inference failed: {0}")]
    Inference(String),
}

type Plan = Arc<TypedSimplePlan>;

/// How the network is evaluated.
enum Backend {
    /// [`SileroNet`]: AVX-512 matrix products over the whole batch.
    Native(Box<SileroNet>),
    /// tract: one optimised plan per batch size.
    Tract(Vec<(usize, Plan)>),
}

/// The compiled model, shared by every stream.
pub struct SileroModel {
    backend: Backend,
}

impl SileroModel {
    /// The process-wide model, compiled on first use and shared afterwards.
    pub fn shared() -> Result<Arc<SileroModel>, VadError> {
        static SHARED: OnceLock<Result<Arc<SileroModel>, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| SileroModel::load().map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(VadError::Load)
    }

    /// The native network where the CPU supports it, tract otherwise (also when the native load fails:
    /// tract is slower but correct, so a failure there is a warning, not a dead VAD).
    pub fn load() -> Result<SileroModel, VadError> {
        if super::gemm::available() {
            match SileroNet::from_onnx(MODEL_BYTES) {
                Ok(net) => {
                    return Ok(SileroModel {
                        backend: Backend::Native(Box::new(net)),
                    });
                }
                Err(error) => tracing::warn!(
                    message = "Native Silero network failed to load; using tract.",
                    %error
                ),
            }
        }
        SileroModel::load_tract()
    }

    /// The tract backend whatever the CPU (reference for tests and benches).
    pub fn load_tract() -> Result<SileroModel, VadError> {
        let mut plans = Vec::with_capacity(PLAN_SIZES.len());
        for &size in &PLAN_SIZES {
            plans.push((
                size,
                compile(size).map_err(|e| VadError::Load(format!("{e:#}")))?,
            ));
        }
        Ok(SileroModel {
            backend: Backend::Tract(plans),
        })
    }

    /// `"native-avx512"`, `"native-avx2"` or `"tract"` (logged at startup).
    pub fn backend_name(&self) -> &'static str {
        match (&self.backend, super::gemm::kernel()) {
            (Backend::Native(_), Some(super::gemm::Kernel::Avx512)) => "native-avx512",
            (Backend::Native(_), _) => "native-avx2",
            (Backend::Tract(_), _) => "tract",
        }
    }

    /// Run `batch` (whole windows of 576 samples) in order from state `h`, `c`; one probability per
    /// window is appended to `probs`.
    fn run(
        &self,
        batch: &[f32],
        h: &mut [f32; STATE],
        c: &mut [f32; STATE],
        probs: &mut Vec<f32>,
    ) -> Result<(), VadError> {
        match &self.backend {
            Backend::Native(net) => {
                thread_local! {
                    // One set of layer buffers per thread, not per stream: a live server holds many
                    // streams and runs only one at a time on each thread.
                    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
                }
                SCRATCH.with(|s| net.run(batch, h, c, &mut s.borrow_mut(), probs));
                Ok(())
            }
            Backend::Tract(plans) => {
                let windows = batch.len() / INPUT;
                let mut w = 0;
                while w < windows {
                    let left = windows - w;
                    let size = PLAN_SIZES.iter().copied().find(|&s| s <= left).unwrap_or(1);
                    let plan = plans
                        .iter()
                        .find(|(s, _)| *s == size)
                        .map(|(_, p)| p)
                        .ok_or_else(|| VadError::Inference(format!("no plan for batch {size}")))?;
                    run_tract(
                        plan,
                        &batch[w * INPUT..(w + size) * INPUT],
                        size,
                        h,
                        c,
                        probs,
                    )
                    .map_err(|e| VadError::Inference(format!("{e:#}")))?;
                    w += size;
                }
                Ok(())
            }
        }
    }
}

fn compile(size: usize) -> TractResult<Plan> {
    let mut reader = std::io::Cursor::new(MODEL_BYTES);
    let model = tract_onnx::onnx()
        .model_for_read(&mut reader)?
        .with_input_fact(0, f32::fact([size, INPUT]).into())?
        .with_input_fact(1, f32::fact([1, 1, STATE]).into())?
        .with_input_fact(2, f32::fact([1, 1, STATE]).into())?
        .into_optimized()?;
    model.into_runnable()
}

fn run_tract(
    plan: &Plan,
    batch: &[f32],
    size: usize,
    h: &mut [f32; STATE],
    c: &mut [f32; STATE],
    probs: &mut Vec<f32>,
) -> TractResult<()> {
    let input = Tensor::from_shape(&[size, INPUT], batch)?;
    let ht = Tensor::from_shape(&[1, 1, STATE], &h[..])?;
    let ct = Tensor::from_shape(&[1, 1, STATE], &c[..])?;
    let result = plan.run(tvec!(input.into(), ht.into(), ct.into()))?;
    let out = |i: usize| result.get(i).map(|t| t.try_as_plain_ram()).transpose();
    let (Some(p), Some(hn), Some(cn)) = (out(0)?, out(1)?, out(2)?) else {
        return Err(TractError::msg("model returned too few outputs"));
    };
    let (hn, cn) = (hn.as_slice::<f32>()?, cn.as_slice::<f32>()?);
    if hn.len() != STATE || cn.len() != STATE {
        return Err(TractError::msg("model returned a state of the wrong size"));
    }
    h.copy_from_slice(hn);
    c.copy_from_slice(cn);
    probs.extend_from_slice(p.as_slice::<f32>()?);
    Ok(())
}

/// Result for one window: where it starts (in samples since the stream began) and its speech probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowProb {
    pub start: u64,
    pub prob: f32,
}

/// One stream's VAD state: pending samples, context, LSTM state, the batch being filled.
pub struct VadStream {
    model: Arc<SileroModel>,
    /// Samples not yet in a classified window; `pending[..CONTEXT]` is the context of the next window.
    pending: Vec<f32>,
    /// Stream offset (samples) of `pending[CONTEXT]`.
    next_start: u64,
    h: [f32; STATE],
    c: [f32; STATE],
    /// Mean-square energy below which a window is skipped as certain silence (0 disables the gate).
    gate_ms: f32,
    /// Model input of the windows waiting to run (576 samples each).
    batch: Vec<f32>,
    /// Results not yet handed out, in stream order; `slots` says which wait for the model.
    queue: Vec<WindowProb>,
    /// Indices into `queue` of the windows in `batch`, in batch order.
    slots: Vec<usize>,
    probs: Vec<f32>,
    windows_run: u64,
    windows_skipped: u64,
}

impl VadStream {
    /// A new stream. `gate_dbfs`: windows with RMS below this level are skipped as silence (`None` = no gate).
    pub fn new(model: Arc<SileroModel>, gate_dbfs: Option<f32>) -> VadStream {
        let gate_ms = gate_dbfs.map_or(0.0, |db| 10f32.powf(db / 10.0));
        let mut pending = Vec::with_capacity(INPUT);
        pending.resize(CONTEXT, 0.0);
        VadStream {
            model,
            pending,
            next_start: 0,
            h: [0.0; STATE],
            c: [0.0; STATE],
            gate_ms,
            batch: Vec::new(),
            queue: Vec::new(),
            slots: Vec::new(),
            probs: Vec::new(),
            windows_run: 0,
            windows_skipped: 0,
        }
    }

    /// Windows the model ran on, and windows the pre-gate skipped.
    pub fn counts(&self) -> (u64, u64) {
        (self.windows_run, self.windows_skipped)
    }

    /// Samples pushed but not yet handed out as window results (partial window and queued windows).
    pub fn buffered(&self) -> usize {
        self.pending.len() - CONTEXT + self.queue.len() * WINDOW
    }

    /// Push samples (normalised f32, 16 kHz mono). Runs full batches; results are appended to `out`.
    pub fn push(&mut self, mut samples: &[f32], out: &mut Vec<WindowProb>) -> Result<(), VadError> {
        // `pending` never holds more than one model input: it is filled to a window, classified and
        // slid by a window, so a stream keeps 2.3 KB here however large its pushes are.
        while !samples.is_empty() {
            let take = (INPUT - self.pending.len()).min(samples.len());
            self.pending.extend_from_slice(&samples[..take]);
            samples = &samples[take..];
            if self.pending.len() == INPUT {
                self.classify_window(out)?;
            }
        }
        if self.slots.is_empty() {
            out.append(&mut self.queue);
        }
        Ok(())
    }

    /// Run every complete window now, with a smaller batch if needed. A partial window stays buffered.
    pub fn flush(&mut self, out: &mut Vec<WindowProb>) -> Result<(), VadError> {
        self.run_batch(out)
    }

    /// End of stream: run every complete window and drop the partial tail (under 32 ms).
    pub fn finish(&mut self, out: &mut Vec<WindowProb>) -> Result<u64, VadError> {
        self.run_batch(out)?;
        let tail = (self.pending.len() - CONTEXT) as u64;
        self.pending.truncate(CONTEXT);
        Ok(tail)
    }

    /// Classify the full window in `pending` and slide it by a window: a gated window gets probability 0,
    /// any other joins the batch, which runs whenever it is full (or the queue behind it grows too long).
    fn classify_window(&mut self, out: &mut Vec<WindowProb>) -> Result<(), VadError> {
        let start = self.next_start;
        if self.is_silent(&self.pending[CONTEXT..INPUT]) {
            self.queue.push(WindowProb { start, prob: 0.0 });
            self.windows_skipped += 1;
        } else {
            self.batch.extend_from_slice(&self.pending[..INPUT]);
            self.slots.push(self.queue.len());
            self.queue.push(WindowProb { start, prob: 0.0 });
        }
        self.pending.drain(..WINDOW);
        self.next_start += WINDOW as u64;
        if self.slots.len() >= BATCH || self.queue.len() >= MAX_QUEUED {
            self.run_batch(out)?;
        }
        Ok(())
    }

    fn is_silent(&self, s: &[f32]) -> bool {
        if self.gate_ms <= 0.0 {
            return false;
        }
        let energy: f32 = s.iter().map(|x| x * x).sum::<f32>() / WINDOW as f32;
        energy < self.gate_ms
    }

    /// Run the batch (whatever its size), fill its slots and hand out every queued result.
    fn run_batch(&mut self, out: &mut Vec<WindowProb>) -> Result<(), VadError> {
        if !self.slots.is_empty() {
            self.probs.clear();
            self.model
                .run(&self.batch, &mut self.h, &mut self.c, &mut self.probs)?;
            if self.probs.len() != self.slots.len() {
                return Err(VadError::Inference(format!(
                    "{} probabilities for {} windows",
                    self.probs.len(),
                    self.slots.len()
                )));
            }
            for (&slot, &p) in self.slots.iter().zip(&self.probs) {
                self.queue[slot].prob = p;
            }
            self.windows_run += self.slots.len() as u64;
            self.slots.clear();
            self.batch.clear();
            // A live stream batches a tick's 1–2 windows and then holds none until its next tick: hand
            // the buffer back (a backlog once grew it to 32 windows, 74 KB, kept for the stream's life).
            // The thread's next session reuses the freed block, so a pipeline thread's streams share one
            // batch's worth of memory instead of holding one each; regrowing costs far less than the model.
            self.batch = Vec::new();
        }
        out.append(&mut self.queue);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Speech-like test signal: a warbling tone in bursts over low noise, with silent stretches.
    fn signal(len: usize) -> Vec<f32> {
        let mut seed = 0x2545_f491u32;
        (0..len)
            .map(|i| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let noise = (seed as f32 / u32::MAX as f32 - 0.5) * 0.01;
                let t = i as f32 / 16_000.0;
                let burst = if (t * 0.7).fract() < 0.5 { 0.3 } else { 0.0 };
                let silent = (t * 0.2).fract() > 0.8;
                if silent {
                    0.0
                } else {
                    burst
                        * (t * 2.0 * std::f32::consts::PI * (180.0 + 60.0 * (t * 3.0).sin())).sin()
                        + noise
                }
            })
            .collect()
    }

    fn probs(model: SileroModel, gate: Option<f32>, x: &[f32], chunk: usize) -> Vec<WindowProb> {
        let mut v = VadStream::new(Arc::new(model), gate);
        let mut out = Vec::new();
        for c in x.chunks(chunk) {
            v.push(c, &mut out).unwrap();
        }
        v.finish(&mut out).unwrap();
        out
    }

    #[cfg_attr(
        not(host_native_vad),
        ignore = "needs a CPU with AVX-512F or AVX2, and FMA (the native Silero network)"
    )]
    #[test]
    fn native_network_matches_tract_gated_and_ungated() {
        assert!(
            SileroModel::load()
                .unwrap()
                .backend_name()
                .starts_with("native-")
        );
        let x = signal(16_000 * 12);
        for gate in [None, Some(-50.0)] {
            let a = probs(SileroModel::load_tract().unwrap(), gate, &x, 4096);
            let b = probs(SileroModel::load().unwrap(), gate, &x, 160);
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(&b) {
                assert_eq!(a.start, b.start);
                assert!((a.prob - b.prob).abs() < 1e-4, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn results_come_out_in_order_whatever_the_push_size_and_gate() {
        let x = signal(16_000 * 5);
        for chunk in [1, 160, 513, 100_000] {
            let out = probs(SileroModel::load().unwrap(), Some(-50.0), &x, chunk);
            assert_eq!(out.len(), x.len() / WINDOW);
            assert!(
                out.iter()
                    .enumerate()
                    .all(|(i, w)| w.start == (i * WINDOW) as u64)
            );
        }
    }

    #[test]
    fn flush_hands_out_every_complete_window() {
        let mut v = VadStream::new(SileroModel::shared().unwrap(), Some(-50.0));
        let mut out = Vec::new();
        v.push(&signal(WINDOW * 3 + 100), &mut out).unwrap();
        v.flush(&mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(v.buffered(), 100);
    }
}
