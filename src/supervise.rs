//! Supervision of background tasks (ledger writer, wake hubs, relay, rescuer, lease
//! heartbeat, breaker probe). A supervised task that panics is logged, counted and started
//! again after a short, growing pause; one that returns has finished its work. Nothing a
//! process depends on can stop silently.

use crate::telemetry::names;
use std::{future::Future, time::Duration};
use tokio::task::JoinHandle;

/// Pause before the n-th restart: 100 ms doubling up to 10 s.
pub fn restart_delay(restarts: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << restarts.min(7))).min(Duration::from_secs(10))
}

/// Runs `make()` as a task, and again whenever it panics. The returned handle ends when a run
/// returns normally (or is aborted).
pub fn spawn<F, Fut>(name: &'static str, make: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut restarts = 0;
        loop {
            match tokio::spawn(make()).await {
                Ok(()) => return,
                Err(e) if e.is_cancelled() => return,
                Err(e) => {
                    tracing::error!(task = name, error = %e, restarts, "background task panicked; restarting");
                    metrics::counter!(names::TASK_RESTARTS, "task" => name).increment(1);
                    tokio::time::sleep(restart_delay(restarts)).await;
                    restarts += 1;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    #[tokio::test]
    async fn a_panicking_task_is_restarted_until_it_finishes() {
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let handle = spawn("test", move || {
            let counter = counter.clone();
            async move {
                if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn restart_delays_grow_and_are_capped() {
        assert_eq!(restart_delay(0), Duration::from_millis(100));
        assert_eq!(restart_delay(3), Duration::from_millis(800));
        assert_eq!(restart_delay(30), Duration::from_secs(10));
    }
}
