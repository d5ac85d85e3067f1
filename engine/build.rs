//! Build-time facts for tests: `cfg(host_native_vad)` when the building machine has AVX-512F or AVX2, and
//! FMA (the native Silero network runs), `cfg(host_avx512)` when it has AVX-512F and FMA, so tests that
//! need them are ignored, with that reason, on a CPU that cannot run them (the code itself always checks
//! the CPU at run time).

fn main() {
    println!("cargo:rustc-check-cfg=cfg(host_avx512)");
    println!("cargo:rustc-check-cfg=cfg(host_native_vad)");
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(target_arch = "x86_64")]
    {
        let target_x86_64 = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64");
        let fma = std::arch::is_x86_feature_detected!("fma");
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        if target_x86_64 && fma && avx512 {
            println!("cargo:rustc-cfg=host_avx512");
        }
        if target_x86_64 && fma && (avx512 || avx2) {
            println!("cargo:rustc-cfg=host_native_vad");
        }
    }
}
