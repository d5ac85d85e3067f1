//! A small f32 matrix product for the native Silero network (`silero_net`), AVX-512 or AVX2 with FMA.
//!
//! `C[m][n] = A[m][k] · B[k][n] + bias[n]` (optionally followed by ReLU), every matrix row-major. The
//! shapes here are small (k ≤ 387, n ≤ 512, m ≤ a few hundred) and the weights `B` are packed once at load
//! time with `n` rounded up to a multiple of [`NR`], so one register-blocked kernel covers every layer.
//! The kernel keeps an `MR × NR` block of `C` in vector registers (intrinsics: LLVM did not vectorise
//! the plain-Rust version) and is only called after a run-time CPU check: two 16-lane registers per
//! row on AVX-512, four 8-lane ones on AVX2. Both accumulate every output element in the same order
//! (`l = 0..k`, one fused multiply-add each), so they give the same bits: probabilities, and therefore
//! metered milliseconds, do not depend on which of the two a machine has.

/// Rows of `A` per AVX-512 register block (12 of its 32 registers accumulate).
const MR: usize = 6;
/// Rows of `A` per AVX2 register block: 3 rows × 4 accumulators, a broadcast per row and the weight
/// register fill the 16 `ymm` registers.
const MR_AVX2: usize = 3;
/// Columns of `B` per register block (two 16-lane AVX-512 registers, four 8-lane AVX2 ones).
pub const NR: usize = 32;

/// The vector instruction set the kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512F and FMA.
    Avx512,
    /// AVX2 and FMA (x86-64-v3).
    Avx2,
}

/// The kernel this CPU runs, if any (checked at run time; the standard library caches the CPU's
/// feature bits, so this is a few loads).
pub fn kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("fma") {
            return None;
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(Kernel::Avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Some(Kernel::Avx2);
        }
        None
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether this CPU runs a vector kernel (AVX-512 or AVX2, with FMA).
pub fn available() -> bool {
    kernel().is_some()
}

/// Weights `B` (`k × n`, `n` padded to a multiple of [`NR`] with zero columns) and a bias of `n` values.
#[derive(Debug, Clone)]
pub struct Packed {
    pub k: usize,
    /// Padded number of columns (`n` rounded up to [`NR`]): the row length of every output.
    pub ld: usize,
    /// Panel-major: column block `q` (columns `q·NR ..`) is `k × NR` contiguous floats. Row-major
    /// storage put consecutive rows of a block 1 KiB apart, which mapped them onto a few L1 sets and
    /// made the kernel wait on L2.
    pub data: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Packed {
    /// Pack `k × n` weights given by `w(row, col)`, with a bias (zeros if `None`).
    pub fn new(
        k: usize,
        n: usize,
        w: impl Fn(usize, usize) -> f32,
        bias: Option<&[f32]>,
    ) -> Packed {
        let ld = n.div_ceil(NR) * NR;
        let mut data = vec![0.0; k * ld];
        for r in 0..k {
            for c in 0..n {
                data[(c / NR) * k * NR + r * NR + c % NR] = w(r, c);
            }
        }
        let mut b = vec![0.0; ld];
        if let Some(bias) = bias {
            b[..n].copy_from_slice(&bias[..n]);
        }
        Packed {
            k,
            ld,
            data,
            bias: b,
        }
    }

    /// The `k × NR` panel of columns `n0 .. n0 + NR` (`n0` a multiple of [`NR`]).
    fn panel(&self, n0: usize) -> &[f32] {
        &self.data[(n0 / NR) * self.k * NR..][..self.k * NR]
    }
}

/// `c[i*ldc + j] = relu?(Σ_l a[i*lda + l] · b[l][j] + bias[j])` for `i < m`, `j < b.ld`.
///
/// `c` must hold `m` rows of `ldc ≥ b.ld` floats and `a` `m` rows of `lda ≥ b.k` floats.
pub fn gemm(a: &[f32], lda: usize, m: usize, b: &Packed, c: &mut [f32], ldc: usize, relu: bool) {
    assert!(lda >= b.k && ldc >= b.ld, "gemm: strides too small");
    assert!(m == 0 || (a.len() >= (m - 1) * lda + b.k && c.len() >= (m - 1) * ldc + b.ld));
    #[cfg(target_arch = "x86_64")]
    match kernel() {
        Some(Kernel::Avx512) => {
            // SAFETY: the CPU has AVX-512F and FMA (checked by `kernel`), all the function requires.
            unsafe { avx512::gemm(a, lda, m, b, c, ldc, relu) };
            return;
        }
        Some(Kernel::Avx2) => {
            // SAFETY: the CPU has AVX2 and FMA (checked by `kernel`), all the function requires.
            unsafe { avx2::gemm(a, lda, m, b, c, ldc, relu) };
            return;
        }
        None => {}
    }
    gemm_scalar(a, lda, m, b, c, ldc, relu);
}

/// `y = x · b` (one row, no bias): the LSTM's recurrent product, which runs once per window and would
/// otherwise wait on one 128-long chain of dependent multiply-adds per 32 columns.
pub fn gemv(x: &[f32], b: &Packed, y: &mut [f32]) {
    assert!(x.len() >= b.k && y.len() >= b.ld, "gemv: slices too short");
    #[cfg(target_arch = "x86_64")]
    match kernel() {
        Some(Kernel::Avx512) if b.ld.is_multiple_of(WIDE) => {
            // SAFETY: the CPU has AVX-512F and FMA (checked by `kernel`), all the function requires.
            unsafe { avx512::gemv(x, b, y) };
            return;
        }
        // Any `ld` that is a multiple of 64 takes a fused path on both kernels (an AVX-512 CPU runs the
        // AVX2 one when its own pass does not divide `ld`), so the two never split between the fused and
        // the scalar (unfused) sum: same bits whatever the CPU. Other `ld`s are scalar on both.
        Some(_)
            if b.ld.is_multiple_of(WIDE_AVX2) && std::arch::is_x86_feature_detected!("avx2") =>
        {
            // SAFETY: `kernel` checked FMA and the line above AVX2, all the function requires.
            unsafe { avx2::gemv(x, b, y) };
            return;
        }
        _ => {}
    }
    let zero = Packed {
        bias: vec![0.0; b.ld],
        ..b.clone()
    };
    gemm_scalar(x, b.k, 1, &zero, y, b.ld, false);
}

/// Columns per pass of [`gemv`] on AVX-512: 16 independent accumulators.
const WIDE: usize = 256;
/// Columns per pass of [`gemv`] on AVX2: 8 independent 8-lane accumulators (two panels), which leave
/// registers for the broadcast and the weights and divide every `ld` that is a multiple of 64 (12, the
/// most the 16 registers could hold, would be 96 columns, which does not divide the LSTM's 512).
const WIDE_AVX2: usize = 64;

/// Portable reference (tests, and CPUs without a vector kernel should they ever call this).
fn gemm_scalar(a: &[f32], lda: usize, m: usize, b: &Packed, c: &mut [f32], ldc: usize, relu: bool) {
    for i in 0..m {
        let row = &a[i * lda..][..b.k];
        let out = &mut c[i * ldc..][..b.ld];
        out.copy_from_slice(&b.bias);
        for (l, &av) in row.iter().enumerate() {
            for (q, out) in out.chunks_exact_mut(NR).enumerate() {
                for (o, &w) in out.iter_mut().zip(&b.panel(q * NR)[l * NR..][..NR]) {
                    *o += av * w;
                }
            }
        }
        if relu {
            out.iter_mut().for_each(|o| *o = o.max(0.0));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR, Packed, WIDE};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn gemm(
        a: &[f32],
        lda: usize,
        m: usize,
        b: &Packed,
        c: &mut [f32],
        ldc: usize,
        relu: bool,
    ) {
        for n0 in (0..b.ld).step_by(NR) {
            let mut i = 0;
            while i + MR <= m {
                block::<MR>(a, lda, i, b, n0, c, ldc, relu);
                i += MR;
            }
            while i < m {
                block::<1>(a, lda, i, b, n0, c, ldc, relu);
                i += 1;
            }
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn gemv(x: &[f32], b: &Packed, y: &mut [f32]) {
        for n0 in (0..b.ld).step_by(WIDE) {
            let mut acc = [_mm512_setzero_ps(); WIDE / 16];
            let panels: [&[f32]; WIDE / NR] = std::array::from_fn(|p| b.panel(n0 + p * NR));
            for (l, &xv) in x[..b.k].iter().enumerate() {
                let xv = _mm512_set1_ps(xv);
                for (q, acc) in acc.iter_mut().enumerate() {
                    let row = &panels[q / 2][l * NR..][..NR];
                    // SAFETY: `row` holds NR = 32 floats (bounds-checked slice); this reads 16 at 0 or 16.
                    let w = unsafe { _mm512_loadu_ps(row.as_ptr().add(16 * (q % 2))) };
                    *acc = _mm512_fmadd_ps(xv, w, *acc);
                }
            }
            let out = &mut y[n0..n0 + WIDE];
            for (q, acc) in acc.into_iter().enumerate() {
                // SAFETY: `out` holds WIDE floats (bounds-checked slice); this writes 16 at 16·q < WIDE.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * q), acc) };
            }
        }
    }

    /// One `R × NR` block of `c`, accumulated in `2R` registers.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    // `l` walks `k` in both the A rows and the packed B rows.
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    fn block<const R: usize>(
        a: &[f32],
        lda: usize,
        i0: usize,
        b: &Packed,
        n0: usize,
        c: &mut [f32],
        ldc: usize,
        relu: bool,
    ) {
        let k = b.k;
        let rows: [&[f32]; R] = std::array::from_fn(|r| &a[(i0 + r) * lda..][..k]);
        let bias = &b.bias[n0..n0 + NR];
        // The B column block: k rows of NR floats, contiguous.
        let bblock = b.panel(n0);
        // SAFETY (all loads in this function): `bias` holds NR = 32 floats and the loads read 16 at
        // offsets 0 and 16; for l < k, `bblock[l·NR ..][.. NR]` lies inside `bblock` (sliced above, so
        // bounds-checked once); `rows[r]` holds k floats and is read at l < k. Unchecked reads keep the
        // inner loop to loads, broadcasts and FMAs.
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_ps(bias.as_ptr()),
                _mm512_loadu_ps(bias.as_ptr().add(16)),
            )
        };
        let mut acc = [[b0, b1]; R];
        let rp: [*const f32; R] = std::array::from_fn(|r| rows[r].as_ptr());
        let mut bp = bblock.as_ptr();
        for l in 0..k {
            let (w0, w1) = unsafe { (_mm512_loadu_ps(bp), _mm512_loadu_ps(bp.add(16))) };
            for r in 0..R {
                let av = _mm512_set1_ps(unsafe { *rp[r].add(l) });
                acc[r][0] = _mm512_fmadd_ps(av, w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(av, w1, acc[r][1]);
            }
            if l + 1 < k {
                bp = unsafe { bp.add(NR) };
            }
        }
        let zero = _mm512_setzero_ps();
        for (r, [v0, v1]) in acc.into_iter().enumerate() {
            let (v0, v1) = if relu {
                (_mm512_max_ps(v0, zero), _mm512_max_ps(v1, zero))
            } else {
                (v0, v1)
            };
            let out = &mut c[(i0 + r) * ldc + n0..][..NR];
            unsafe {
                _mm512_storeu_ps(out.as_mut_ptr(), v0);
                _mm512_storeu_ps(out.as_mut_ptr().add(16), v1);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR_AVX2, NR, Packed, WIDE_AVX2};
    use std::arch::x86_64::*;

    /// 8-lane registers per NR columns.
    const Q: usize = NR / 8;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gemm(
        a: &[f32],
        lda: usize,
        m: usize,
        b: &Packed,
        c: &mut [f32],
        ldc: usize,
        relu: bool,
    ) {
        for n0 in (0..b.ld).step_by(NR) {
            let mut i = 0;
            while i + MR_AVX2 <= m {
                block::<MR_AVX2>(a, lda, i, b, n0, c, ldc, relu);
                i += MR_AVX2;
            }
            while i < m {
                block::<1>(a, lda, i, b, n0, c, ldc, relu);
                i += 1;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gemv(x: &[f32], b: &Packed, y: &mut [f32]) {
        for n0 in (0..b.ld).step_by(WIDE_AVX2) {
            let mut acc = [_mm256_setzero_ps(); WIDE_AVX2 / 8];
            let panels: [&[f32]; WIDE_AVX2 / NR] = std::array::from_fn(|p| b.panel(n0 + p * NR));
            for (l, &xv) in x[..b.k].iter().enumerate() {
                let xv = _mm256_set1_ps(xv);
                for (q, acc) in acc.iter_mut().enumerate() {
                    let row = &panels[q / Q][l * NR..][..NR];
                    // SAFETY: `row` holds NR = 32 floats (bounds-checked slice); this reads 8 at 8·(q % 4).
                    let w = unsafe { _mm256_loadu_ps(row.as_ptr().add(8 * (q % Q))) };
                    *acc = _mm256_fmadd_ps(xv, w, *acc);
                }
            }
            let out = &mut y[n0..n0 + WIDE_AVX2];
            for (q, acc) in acc.into_iter().enumerate() {
                // SAFETY: `out` holds WIDE_AVX2 floats (bounds-checked slice); this writes 8 at 8·q.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * q), acc) };
            }
        }
    }

    /// One `R × NR` block of `c`, accumulated in `4R` registers.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    fn block<const R: usize>(
        a: &[f32],
        lda: usize,
        i0: usize,
        b: &Packed,
        n0: usize,
        c: &mut [f32],
        ldc: usize,
        relu: bool,
    ) {
        let k = b.k;
        let rows: [&[f32]; R] = std::array::from_fn(|r| &a[(i0 + r) * lda..][..k]);
        let bias = &b.bias[n0..n0 + NR];
        let bblock = b.panel(n0);
        // SAFETY (all loads in this function): `bias` holds NR = 32 floats, read 8 at 8·q for q < 4; for
        // l < k, `bblock[l·NR ..][.. NR]` lies inside `bblock` (sliced above, so bounds-checked once);
        // `rows[r]` holds k floats and is read at l < k.
        // Plain loops (the `array::from_fn` closures they replaced measured the same within 4 %).
        let mut bv = [_mm256_setzero_ps(); Q];
        for q in 0..Q {
            bv[q] = unsafe { _mm256_loadu_ps(bias.as_ptr().add(8 * q)) };
        }
        let mut acc = [bv; R];
        let rp: [*const f32; R] = std::array::from_fn(|r| rows[r].as_ptr());
        let mut bp = bblock.as_ptr();
        let mut av = [_mm256_setzero_ps(); R];
        for l in 0..k {
            for r in 0..R {
                av[r] = _mm256_set1_ps(unsafe { *rp[r].add(l) });
            }
            for q in 0..Q {
                let w = unsafe { _mm256_loadu_ps(bp.add(8 * q)) };
                for r in 0..R {
                    acc[r][q] = _mm256_fmadd_ps(av[r], w, acc[r][q]);
                }
            }
            if l + 1 < k {
                bp = unsafe { bp.add(NR) };
            }
        }
        let zero = _mm256_setzero_ps();
        for (r, row) in acc.into_iter().enumerate() {
            let out = &mut c[(i0 + r) * ldc + n0..][..NR];
            for (q, v) in row.into_iter().enumerate() {
                let v = if relu { _mm256_max_ps(v, zero) } else { v };
                // SAFETY: `out` holds NR = 32 floats (bounds-checked slice); this writes 8 at 8·q < 32.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * q), v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_matches_a_naive_product() {
        let (k, n) = (128, 512);
        let x: Vec<f32> = (0..k).map(|i| (i % 9) as f32 / 4.0 - 1.0).collect();
        let w = |r: usize, c: usize| ((r * 5 + c * 3) % 17) as f32 / 8.0 - 1.0;
        let b = Packed::new(k, n, w, Some(&[9.0; 512]));
        let mut y = vec![f32::NAN; b.ld];
        gemv(&x, &b, &mut y);
        for (j, &got) in y.iter().enumerate() {
            let want: f32 = (0..k).map(|l| x[l] * w(l, j)).sum();
            assert!((got - want).abs() < 1e-3, "{j}: {got} vs {want}");
        }
    }

    /// Each kernel this CPU has against the naive product, and the two kernels against each other bit
    /// for bit where both exist (the metered milliseconds must not depend on the processor).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_and_avx512_kernels_give_the_same_bits() {
        let has = |f: &str| match f {
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            _ => std::arch::is_x86_feature_detected!("avx512f"),
        };
        if !std::arch::is_x86_feature_detected!("fma") || !has("avx2") {
            eprintln!("no AVX2 with FMA on this CPU: nothing to compare");
            return;
        }
        let (m, k, n) = (17, 131, 96);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let w = |r: usize, c: usize| ((r * 3 + c * 5) % 19) as f32 / 9.0 - 1.0;
        let bias: Vec<f32> = (0..n).map(|j| j as f32 / 13.0 - 3.0).collect();
        let b = Packed::new(k, n, w, Some(&bias));
        let mut c2 = vec![f32::NAN; m * b.ld];
        // SAFETY: AVX2 and FMA checked above.
        unsafe { avx2::gemm(&a, k, m, &b, &mut c2, b.ld, true) };
        for i in 0..m {
            for j in 0..n {
                let want = (0..k)
                    .fold(bias[j], |acc, l| a[i * k + l].mul_add(w(l, j), acc))
                    .max(0.0);
                assert_eq!(
                    c2[i * b.ld + j],
                    want,
                    "({i},{j}): AVX2 is not the fused sum in order"
                );
            }
        }
        let x: Vec<f32> = (0..128).map(|i| (i % 9) as f32 / 4.0 - 1.0).collect();
        let r = Packed::new(128, 512, w, None);
        let mut y2 = vec![f32::NAN; r.ld];
        // SAFETY: AVX2 and FMA checked above.
        unsafe { avx2::gemv(&x, &r, &mut y2) };
        for (j, &got) in y2.iter().enumerate() {
            let want = (0..128).fold(0.0f32, |acc, l| x[l].mul_add(w(l, j), acc));
            assert_eq!(got, want, "gemv column {j}");
        }
        // Through the dispatch, with an `ld` the AVX-512 pass does not divide (320): still the fused sum.
        let r320 = Packed::new(128, 320, w, None);
        let mut y = vec![f32::NAN; r320.ld];
        gemv(&x, &r320, &mut y);
        for (j, &got) in y.iter().enumerate() {
            let want = (0..128).fold(0.0f32, |acc, l| x[l].mul_add(w(l, j), acc));
            assert_eq!(got, want, "dispatched gemv column {j}");
        }
        if has("avx512") {
            let mut c5 = vec![f32::NAN; m * b.ld];
            let mut y5 = vec![f32::NAN; r.ld];
            // SAFETY: AVX-512F and FMA checked just above.
            unsafe {
                avx512::gemm(&a, k, m, &b, &mut c5, b.ld, true);
                avx512::gemv(&x, &r, &mut y5);
            }
            assert_eq!(c2, c5);
            assert_eq!(y2, y5);
        }
    }

    #[test]
    fn matches_a_naive_product_with_bias_and_relu() {
        let (m, k, n) = (13, 37, 45);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let w = |r: usize, c: usize| ((r * 3 + c * 5) % 13) as f32 / 7.0 - 0.9;
        let bias: Vec<f32> = (0..n).map(|j| j as f32 / 10.0 - 2.0).collect();
        let b = Packed::new(k, n, w, Some(&bias));
        for (relu, scalar) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = vec![f32::NAN; m * b.ld];
            if scalar {
                gemm_scalar(&a, k, m, &b, &mut c, b.ld, relu);
            } else {
                gemm(&a, k, m, &b, &mut c, b.ld, relu);
            }
            for i in 0..m {
                for j in 0..n {
                    let mut want = bias[j];
                    for l in 0..k {
                        want += a[i * k + l] * w(l, j);
                    }
                    if relu {
                        want = want.max(0.0);
                    }
                    let got = c[i * b.ld + j];
                    assert!((got - want).abs() < 1e-4, "({i},{j}): {got} vs {want}");
                }
            }
        }
    }
}
