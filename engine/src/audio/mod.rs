//! Audio: the `.bin` container, device file names, codecs, resampling to 16 kHz, Silero VAD, the
//! speech detector (window probabilities → raw runs) and segment rules (metering and STT merging).

pub mod codec;
pub mod container;
pub mod detector;
pub mod filename;
pub(crate) mod gemm;
pub mod opus_dec;
pub mod resample;
pub mod segments;
pub(crate) mod silero_net;
pub mod simd;
pub mod vad;
pub mod wav;
