//! Build-time facts for tests: `cfg(host_avx512)` when the building machine has AVX-512F and FMA, so tests
//! of the native Silero network are ignored, with that reason, on a CPU that cannot run them (the code itself
//! always checks the CPU at run time).

fn main() {
    println!("cargo:rustc-check-cfg=cfg(host_avx512)");
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(target_arch = "x86_64")]
    {
        let target_x86_64 = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64");
        if target_x86_64
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
        {
            println!("cargo:rustc-cfg=host_avx512");
        }
    }
}
