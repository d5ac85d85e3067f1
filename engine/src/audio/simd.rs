//! SIMD state hygiene between tract and libopus.
//!
//! tract's hand-written AVX kernels return with the upper halves of the YMM registers dirty. libopus is
//! built with SSE code (no VEX encoding), and on many x86 cores every SSE instruction then pays a
//! state-transition penalty: decoding ran 1.8–3x slower in the same thread after a VAD call. Clearing
//! the upper state once after each inference (`vzeroupper`) removes the penalty.

/// Clear the upper YMM state if this CPU has AVX; a no-op elsewhere.
#[inline]
pub fn clear_upper_simd_state() {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU supports AVX (checked at run time just above), which is all
            // `vzeroupper` requires; it changes no memory and no architectural state a caller relies on.
            unsafe { vzeroupper() }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn vzeroupper() {
    std::arch::x86_64::_mm256_zeroupper();
}
