//! [`OwnedRuntime`]: the small runtime a remote provider runs its network tasks on (never a pipeline
//! thread), droppable anywhere.

/// A runtime that may be dropped anywhere, an async context included (it shuts down in the background).
pub(crate) struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl OwnedRuntime {
    /// A one-worker runtime with timers and I/O, its thread named `name`.
    pub(crate) fn start(name: &str) -> std::io::Result<OwnedRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(OwnedRuntime(Some(runtime)))
    }

    /// The runtime, until it is dropped.
    pub(crate) fn get(&self) -> Option<&tokio::runtime::Runtime> {
        self.0.as_ref()
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
