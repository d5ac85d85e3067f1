//! Moonshine's C library, loaded at run time.
//!
//! The C API (from the ctypes declarations of the wheel's `moonshine_cpp.py`, moonshine-cpp 0.1.4):
//!
//! ```c
//! int  moonshine_load_model(const char *encoder, const char *decoder, const char *tokenizer, int32_t type);
//! int  moonshine_transcribe(int handle, const float *pcm_16k, size_t n, char **out);  // 0 = ok
//! void moonshine_free_text(char *text);
//! void moonshine_free_model(int handle);
//! ```
//!
//! `libmoonshine.so` names ONNX Runtime by its SONAME (`libonnxruntime.so.1`) and carries no run path, so
//! ONNX Runtime is loaded first by absolute path: the dynamic loader then finds it already loaded.

use std::ffi::{CStr, CString, c_char, c_int};
use std::path::{Path, PathBuf};

use libloading::Library;

use crate::stt::types::SttError;

type LoadModel = unsafe extern "C" fn(*const c_char, *const c_char, *const c_char, i32) -> c_int;
type Transcribe = unsafe extern "C" fn(c_int, *const f32, usize, *mut *mut c_char) -> c_int;
type FreeText = unsafe extern "C" fn(*mut c_char);
type FreeModel = unsafe extern "C" fn(c_int);

/// Moonshine's model size argument: 1 = base.
const MODEL_TYPE_BASE: i32 = 1;

/// The files of an installed engine (`scripts/deps.sh` unpacks the wheel's `moonshine_cpp/` folder).
#[derive(Debug, Clone)]
pub struct EngineFiles {
    pub dir: PathBuf,
}

impl EngineFiles {
    pub fn new(dir: impl Into<PathBuf>) -> EngineFiles {
        EngineFiles { dir: dir.into() }
    }

    fn onnxruntime(&self) -> PathBuf {
        self.dir.join("libonnxruntime.so.1")
    }
    fn library(&self) -> PathBuf {
        self.dir.join("libmoonshine.so")
    }
    fn model(&self, file: &str) -> PathBuf {
        self.dir.join("models").join("base-en").join(file)
    }
    fn model_files(&self) -> [PathBuf; 3] {
        [
            self.model("encoder_model.ort"),
            self.model("decoder_model_merged.ort"),
            self.model("tokenizer.bin"),
        ]
    }

    /// Whether every file the engine needs is present (cheap: no loading).
    pub fn missing(&self) -> Option<PathBuf> {
        [self.onnxruntime(), self.library()]
            .into_iter()
            .chain(self.model_files())
            .find(|p| !p.is_file())
    }
}

/// Why this CPU cannot run the engine, or `None` when it can.
///
/// `libmoonshine.so` of moonshine-cpp 0.1.4 is compiled for AVX-512 outside any run-time dispatch (its
/// `moonshine_load_model` executes the EVEX form `vpbroadcastq %rax,%xmm0`): on a CPU without it the first
/// call ends the whole process with SIGILL (measured on an AVX2-only AMD EPYC). ONNX Runtime, beside it,
/// picks its kernels at run time and is not the constraint. The check asks for the x86-64-v4 set, the
/// level such a build targets.
pub fn cpu_unsupported() -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        let lacking: Vec<&str> = [
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx512vl", std::arch::is_x86_feature_detected!("avx512vl")),
            ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
            ("avx512dq", std::arch::is_x86_feature_detected!("avx512dq")),
            ("avx512cd", std::arch::is_x86_feature_detected!("avx512cd")),
        ]
        .into_iter()
        .filter_map(|(name, present)| (!present).then_some(name))
        .collect();
        if lacking.is_empty() {
            None
        } else {
            Some(format!(
                "this CPU lacks {}, which libmoonshine.so of moonshine-cpp {} is compiled for (it would end the process with SIGILL)",
                lacking.join(", "),
                super::ENGINE_VERSION
            ))
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Some("the moonshine-cpp wheel's libraries are built for x86_64 only".to_string())
    }
}

/// The loaded library. Loading it twice is harmless (the loader counts references).
pub struct MoonshineLib {
    load_model: LoadModel,
    transcribe: Transcribe,
    free_text: FreeText,
    free_model: FreeModel,
    files: EngineFiles,
    // Dropped last: the function pointers above point into these.
    _moonshine: Library,
    _onnxruntime: Library,
}

impl std::fmt::Debug for MoonshineLib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoonshineLib")
            .field("dir", &self.files.dir)
            .finish()
    }
}

/// The refusals before loading: a missing file, a CPU the library cannot run on.
pub fn check_loadable(files: &EngineFiles) -> Result<(), SttError> {
    if let Some(missing) = files.missing() {
        return Err(SttError::NotInstalled(format!(
            "{} is missing (run scripts/deps.sh, or set VOICEGATE_STT_LOCAL_DIR)",
            missing.display()
        )));
    }
    if let Some(why) = cpu_unsupported() {
        return Err(SttError::LoadFailed(why));
    }
    Ok(())
}

impl MoonshineLib {
    pub fn load(files: &EngineFiles) -> Result<MoonshineLib, SttError> {
        check_loadable(files)?;
        let open = |path: &Path| {
            // SAFETY: these are the wheel's libraries, whose initialisers only set up their own state.
            unsafe { Library::new(path) }
                .map_err(|e| SttError::LoadFailed(format!("{}: {e}", path.display())))
        };
        let onnxruntime = open(&files.onnxruntime())?;
        let moonshine = open(&files.library())?;
        let symbol_error =
            |e: libloading::Error| SttError::LoadFailed(format!("libmoonshine.so: {e}"));
        // SAFETY: the signatures are the C API's (module docs); the pointers stay valid while `moonshine`
        // is alive, and it lives in the same struct, dropped after them.
        unsafe {
            Ok(MoonshineLib {
                load_model: *moonshine
                    .get::<LoadModel>(b"moonshine_load_model\0")
                    .map_err(symbol_error)?,
                transcribe: *moonshine
                    .get::<Transcribe>(b"moonshine_transcribe\0")
                    .map_err(symbol_error)?,
                free_text: *moonshine
                    .get::<FreeText>(b"moonshine_free_text\0")
                    .map_err(symbol_error)?,
                free_model: *moonshine
                    .get::<FreeModel>(b"moonshine_free_model\0")
                    .map_err(symbol_error)?,
                files: files.clone(),
                _moonshine: moonshine,
                _onnxruntime: onnxruntime,
            })
        }
    }

    /// Loads one instance of the base-en model (0.5 s, ~180 MB). Each worker owns one.
    pub fn load_model(self: &std::sync::Arc<Self>) -> Result<Model, SttError> {
        let c = |p: PathBuf| {
            CString::new(p.to_string_lossy().into_owned())
                .map_err(|_| SttError::LoadFailed(format!("{} has a NUL byte", p.display())))
        };
        let [encoder, decoder, tokenizer] = self.files.model_files();
        let (encoder, decoder, tokenizer) = (c(encoder)?, c(decoder)?, c(tokenizer)?);
        // SAFETY: three valid NUL-terminated paths; the library returns a handle or a negative value.
        let handle = unsafe {
            (self.load_model)(
                encoder.as_ptr(),
                decoder.as_ptr(),
                tokenizer.as_ptr(),
                MODEL_TYPE_BASE,
            )
        };
        if handle < 0 {
            return Err(SttError::LoadFailed(format!(
                "moonshine_load_model returned {handle} for {}",
                self.files.dir.display()
            )));
        }
        Ok(Model {
            lib: std::sync::Arc::clone(self),
            handle,
        })
    }
}

/// One loaded model. Not shared between threads: the library gives no thread-safety promise for one handle.
pub struct Model {
    lib: std::sync::Arc<MoonshineLib>,
    handle: c_int,
}

impl Model {
    /// Transcribes 16 kHz mono floats. Blocks for as long as the engine computes (about a fifth to a half of
    /// the audio's duration on one core).
    pub fn transcribe(&mut self, pcm: &[f32]) -> Result<String, SttError> {
        if pcm.is_empty() {
            return Ok(String::new());
        }
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: `pcm` is valid for `pcm.len()` floats during the call; `out` receives a string the library
        // allocated (freed below with its own free function) or stays null.
        let status =
            unsafe { (self.lib.transcribe)(self.handle, pcm.as_ptr(), pcm.len(), &mut out) };
        let text = if out.is_null() {
            String::new()
        } else {
            // SAFETY: non-null `out` is a NUL-terminated string owned by the library until freed.
            let text = unsafe { CStr::from_ptr(out) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: `out` came from moonshine_transcribe and is freed once.
            unsafe { (self.lib.free_text)(out) };
            text
        };
        if status != 0 {
            return Err(SttError::Engine(format!(
                "moonshine_transcribe returned {status}"
            )));
        }
        Ok(text.trim().to_string())
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the handle came from moonshine_load_model and is freed once.
        unsafe { (self.lib.free_model)(self.handle) };
    }
}
