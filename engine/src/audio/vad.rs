//! Silero VAD (v6, 16 kHz) run in-process by `tract-onnx`, with carried state and batched windows.
//!
//! The model is `silero_vad_16k_sequence.onnx` from the `silero-vad` 6.2.3 PyPI package (MIT, see
//! `engine/models/`): input `[S, 576]` = S consecutive windows of 64 context + 512 new samples, LSTM
//! state `h`, `c` `[1, 1, 128]` carried across calls. One call over S windows costs far less than S
//! calls over one, so a stream runs full batches of [`BATCH`] windows and only runs smaller batches when
//! asked to flush (end of file, or a live session that wants its latest windows now).
//!
//! A cheap energy pre-gate skips windows that are certainly silence (RMS below the gate): they get
//! probability 0 and do not advance the LSTM state, so the model sees a contiguous speech-bearing signal.

use std::sync::{Arc, OnceLock};
use tract_onnx::prelude::*;

/// Samples per VAD window at 16 kHz (32 ms).
pub const WINDOW: usize = 512;
/// Context samples prepended to every window (the tail of the previous window).
pub const CONTEXT: usize = 64;
/// Windows per full batch (about one second of audio).
pub const BATCH: usize = 32;
/// Batch sizes with a compiled plan, largest first. Every count of windows is a sum of these.
const PLAN_SIZES: [usize; 3] = [BATCH, 8, 1];
const STATE: usize = 128;

static MODEL_BYTES: &[u8] = include_bytes!("../../models/silero_vad_16k_sequence.onnx");

/// Errors from loading or running the VAD model.
#[derive(Debug, thiserror::Error)]
pub enum VadError {
    #[error("VAD model failed to load: {0}")]
    Load(String),
    #[error("VAD inference failed: {0}")]
    Inference(String),
}

type Plan = Arc<TypedSimplePlan>;

/// The compiled model: one optimised plan per batch size, shared by every stream.
pub struct SileroModel {
    plans: Vec<(usize, Plan)>,
}

impl SileroModel {
    /// The process-wide model, compiled on first use (about a second) and shared afterwards.
    pub fn shared() -> Result<Arc<SileroModel>, VadError> {
        static SHARED: OnceLock<Result<Arc<SileroModel>, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| SileroModel::load().map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(VadError::Load)
    }

    fn load() -> Result<SileroModel, VadError> {
        let mut plans = Vec::with_capacity(PLAN_SIZES.len());
        for &size in &PLAN_SIZES {
            plans.push((
                size,
                compile(size).map_err(|e| VadError::Load(format!("{e:#}")))?,
            ));
        }
        Ok(SileroModel { plans })
    }

    fn plan(&self, size: usize) -> Option<&Plan> {
        self.plans.iter().find(|(s, _)| *s == size).map(|(_, p)| p)
    }
}

fn zero_state() -> Tensor {
    tract_ndarray::Array3::<f32>::zeros((1, 1, STATE)).into_tensor()
}

fn compile(size: usize) -> TractResult<Plan> {
    let mut reader = std::io::Cursor::new(MODEL_BYTES);
    let model = tract_onnx::onnx()
        .model_for_read(&mut reader)?
        .with_input_fact(0, f32::fact([size, WINDOW + CONTEXT]).into())?
        .with_input_fact(1, f32::fact([1, 1, STATE]).into())?
        .with_input_fact(2, f32::fact([1, 1, STATE]).into())?
        .into_optimized()?;
    model.into_runnable()
}

/// Result for one window: where it starts (in samples since the stream began) and its speech probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowProb {
    pub start: u64,
    pub prob: f32,
}

/// One stream's VAD state: pending samples, context, LSTM state.
pub struct VadStream {
    model: Arc<SileroModel>,
    /// Pending samples; `pending[..CONTEXT]` is the context of the next window.
    pending: Vec<f32>,
    /// Stream offset (samples) of `pending[CONTEXT]`.
    next_start: u64,
    h: Tensor,
    c: Tensor,
    /// Mean-square energy below which a window is skipped as certain silence (0 disables the gate).
    gate_ms: f32,
    /// Scratch for one batch of model input.
    batch: Vec<f32>,
    /// Indices (into the current run) of windows sent to the model.
    windows_run: u64,
    windows_skipped: u64,
}

impl VadStream {
    /// A new stream. `gate_dbfs`: windows with RMS below this level are skipped as silence (`None` = no gate).
    pub fn new(model: Arc<SileroModel>, gate_dbfs: Option<f32>) -> VadStream {
        let gate_ms = gate_dbfs.map_or(0.0, |db| 10f32.powf(db / 10.0));
        let mut pending = Vec::with_capacity(CONTEXT + WINDOW * (BATCH + 1));
        pending.resize(CONTEXT, 0.0);
        VadStream {
            model,
            pending,
            next_start: 0,
            h: zero_state(),
            c: zero_state(),
            gate_ms,
            batch: Vec::with_capacity(BATCH * (WINDOW + CONTEXT)),
            windows_run: 0,
            windows_skipped: 0,
        }
    }

    /// Windows the model ran on, and windows the pre-gate skipped.
    pub fn counts(&self) -> (u64, u64) {
        (self.windows_run, self.windows_skipped)
    }

    /// Samples pushed but not yet in a finished window.
    pub fn buffered(&self) -> usize {
        self.pending.len() - CONTEXT
    }

    /// Push samples (normalised f32, 16 kHz mono). Runs full batches; results are appended to `out`.
    pub fn push(&mut self, samples: &[f32], out: &mut Vec<WindowProb>) -> Result<(), VadError> {
        self.pending.extend_from_slice(samples);
        if self.buffered() >= BATCH * WINDOW {
            self.process(false, out)?;
        }
        Ok(())
    }

    /// Run every complete window now, with smaller batches if needed. A partial window stays buffered.
    pub fn flush(&mut self, out: &mut Vec<WindowProb>) -> Result<(), VadError> {
        self.process(true, out)
    }

    /// End of stream: run every complete window and drop the partial tail (under 32 ms).
    pub fn finish(&mut self, out: &mut Vec<WindowProb>) -> Result<u64, VadError> {
        self.process(true, out)?;
        let tail = self.buffered() as u64;
        self.pending.truncate(CONTEXT);
        Ok(tail)
    }

    fn process(&mut self, all: bool, out: &mut Vec<WindowProb>) -> Result<(), VadError> {
        let windows = self.buffered() / WINDOW;
        let usable = if all {
            windows
        } else {
            windows - windows % BATCH
        };
        if usable == 0 {
            return Ok(());
        }
        // Classify each window: gated (silence) or to run. Runs of to-run windows go to the model in batches.
        let mut w = 0;
        while w < usable {
            if self.is_silent(w) {
                out.push(WindowProb {
                    start: self.next_start + (w * WINDOW) as u64,
                    prob: 0.0,
                });
                self.windows_skipped += 1;
                w += 1;
                continue;
            }
            let mut end = w + 1;
            while end < usable && end - w < BATCH && !self.is_silent(end) {
                end += 1;
            }
            self.run_windows(w, end, out)?;
            w = end;
        }
        let consumed = usable * WINDOW;
        self.pending.drain(..consumed);
        self.next_start += consumed as u64;
        Ok(())
    }

    fn is_silent(&self, w: usize) -> bool {
        if self.gate_ms <= 0.0 {
            return false;
        }
        let s = &self.pending[CONTEXT + w * WINDOW..CONTEXT + (w + 1) * WINDOW];
        let energy: f32 = s.iter().map(|x| x * x).sum::<f32>() / WINDOW as f32;
        energy < self.gate_ms
    }

    /// Run windows `from..to` (indices into pending) through the model using the compiled batch sizes.
    fn run_windows(
        &mut self,
        from: usize,
        to: usize,
        out: &mut Vec<WindowProb>,
    ) -> Result<(), VadError> {
        let mut w = from;
        while w < to {
            let left = to - w;
            let size = PLAN_SIZES.iter().copied().find(|&s| s <= left).unwrap_or(1);
            self.run_batch(w, size, out)?;
            w += size;
        }
        Ok(())
    }

    fn run_batch(
        &mut self,
        w: usize,
        size: usize,
        out: &mut Vec<WindowProb>,
    ) -> Result<(), VadError> {
        let plan = self
            .model
            .plan(size)
            .ok_or_else(|| VadError::Inference(format!("no plan for batch {size}")))?
            .clone();
        self.batch.clear();
        for i in w..w + size {
            // Window i spans pending[CONTEXT + i*WINDOW ..][..WINDOW]; its context is the 64 samples before.
            let start = i * WINDOW;
            self.batch
                .extend_from_slice(&self.pending[start..start + CONTEXT + WINDOW]);
        }
        let input = Tensor::from_shape(&[size, CONTEXT + WINDOW], &self.batch)
            .map_err(|e| VadError::Inference(format!("{e:#}")))?;
        let h = std::mem::replace(&mut self.h, Tensor::from(0f32));
        let c = std::mem::replace(&mut self.c, Tensor::from(0f32));
        let mut result = plan
            .run(tvec!(input.into(), h.into(), c.into()))
            .map_err(|e| VadError::Inference(format!("{e:#}")))?;
        if result.len() != 3 {
            return Err(VadError::Inference(format!(
                "model returned {} outputs",
                result.len()
            )));
        }
        let cn = result.pop().map(|t| t.into_tensor());
        let hn = result.pop().map(|t| t.into_tensor());
        let probs = result.pop().map(|t| t.into_tensor());
        let (Some(probs), Some(hn), Some(cn)) = (probs, hn, cn) else {
            return Err(VadError::Inference("missing model output".into()));
        };
        self.h = hn;
        self.c = cn;
        let view = probs
            .try_as_plain_ram()
            .map_err(|e| VadError::Inference(format!("{e:#}")))?;
        let probs = view
            .as_slice::<f32>()
            .map_err(|e| VadError::Inference(format!("{e:#}")))?;
        for (k, &p) in probs.iter().enumerate() {
            out.push(WindowProb {
                start: self.next_start + ((w + k) * WINDOW) as u64,
                prob: p,
            });
        }
        self.windows_run += size as u64;
        Ok(())
    }
}
