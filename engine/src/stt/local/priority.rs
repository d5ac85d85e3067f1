//! Thread priority: the workers run below the pipeline threads.

/// Adds `nice` to the calling thread's niceness (Linux: niceness is per thread, and threads it starts
/// inherit it). Elsewhere a no-op.
pub fn lower_priority(nice: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if nice <= 0 {
            return Ok(());
        }
        // SAFETY: gettid has no preconditions; get/setpriority on our own thread id touch only this thread.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            *libc::__errno_location() = 0;
            let current = libc::getpriority(libc::PRIO_PROCESS, tid);
            if current == -1 && *libc::__errno_location() != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let target = (current + nice).min(19);
            if libc::setpriority(libc::PRIO_PROCESS, tid, target) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
    Ok(())
}

/// The calling thread's niceness (Linux), for tests and diagnostics.
#[cfg(target_os = "linux")]
pub fn current_niceness() -> i32 {
    // SAFETY: as in `lower_priority`.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    }
}
