//! Background tasks that end with their owner: every task spawned through [`Tasks`] is
//! tracked, and [`Tasks::shutdown`] stops them where they stand and waits for them (bounded),
//! so nothing keeps running, writing or calling out after a component has stopped.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A set of tracked, cancellable background tasks.
#[derive(Debug, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` on `runtime` until it ends or [`shutdown`](Self::shutdown) (then it is
    /// dropped where it stands).
    pub fn spawn_on<F>(&self, task: F, runtime: &tokio::runtime::Handle)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn_on(
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    () = task => {}
                }
            },
            runtime,
        );
    }

    /// [`spawn_on`](Self::spawn_on) the current runtime.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn_on(task, &tokio::runtime::Handle::current());
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Stops every task, refuses none spawned later (they stop at once), and waits at most
    /// `within` for all to end. Returns whether they did.
    pub async fn shutdown(&self, within: Duration) -> bool {
        self.stop.cancel();
        self.tracker.close();
        tokio::time::timeout(within, self.tracker.wait()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Counts its drops: a task ended (finished or stopped) drops its guard.
    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn shutdown_ends_running_tasks_and_later_ones() {
        let tasks = Tasks::new();
        let ended = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let guard = Guard(ended.clone());
            tasks.spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            });
        }
        let guard = Guard(ended.clone());
        tasks.spawn(async move {
            let _guard = guard;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(ended.load(Ordering::SeqCst), 1, "only the task that finished ended");
        assert_eq!(tasks.len(), 3);
        assert!(tasks.shutdown(Duration::from_secs(5)).await, "every task ended");
        assert_eq!(ended.load(Ordering::SeqCst), 4);
        assert!(tasks.is_empty());
        // Spawned after the shutdown: stopped at once.
        let guard = Guard(ended.clone());
        tasks.spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(ended.load(Ordering::SeqCst), 5);
    }
}
