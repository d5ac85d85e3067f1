//! Named arbiter threads.
//!
//! actix names every arbiter thread `actix-rt|system:N|arbiter:M`, which the kernel cuts to the same
//! 15 bytes (`actix-rt|system`) for all of them, so `top -H`, `perf` and `/proc/<pid>/task/*/comm` cannot
//! tell a pipeline thread from a meter shard. [`named_arbiter`] renames the new thread once it runs.

use actix::Arbiter;

/// Longest thread name Linux keeps (16 bytes with the terminating NUL).
const MAX_NAME: usize = 15;

/// Starts an arbiter whose thread is named `name` (cut to 15 bytes on a character boundary).
///
/// Naming is best effort: where `/proc/thread-self/comm` cannot be written (not Linux, no `/proc`), the
/// thread keeps actix's name and nothing else changes.
pub fn named_arbiter(name: &str) -> Arbiter {
    let arbiter = Arbiter::new();
    let name = cut(name).to_owned();
    arbiter.spawn_fn(move || {
        if let Err(error) = std::fs::write("/proc/thread-self/comm", name.as_bytes()) {
            tracing::debug!(message = "could not name the thread", thread = %name, %error);
        }
    });
    arbiter
}

fn cut(name: &str) -> &str {
    if name.len() <= MAX_NAME {
        return name;
    }
    let mut end = MAX_NAME;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_to_fifteen_bytes_on_a_char_boundary() {
        assert_eq!(cut("vg-pipeline-0"), "vg-pipeline-0");
        assert_eq!(cut("vg-pipeline-0123456789"), "vg-pipeline-012");
        // 'é' is 2 bytes: 14 ASCII bytes + 'é' would be 16, so the cut falls before it.
        assert_eq!(cut("abcdefghijklmné"), "abcdefghijklmn");
    }

    #[cfg(target_os = "linux")]
    #[actix::test]
    async fn the_arbiter_thread_carries_the_name() {
        let arbiter = named_arbiter("vg-test-name");
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Runs after the rename: an arbiter runs what it is given in order.
        arbiter.spawn_fn(move || {
            let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
            let _ = tx.send(comm);
        });
        let comm = rx.await.expect("arbiter answered");
        assert_eq!(comm.trim_end(), "vg-test-name");
        arbiter.stop();
    }
}
