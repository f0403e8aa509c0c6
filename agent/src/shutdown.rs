//! The one shutdown path of `serve` and `remediate`, as kubert's: the first SIGTERM or
//! SIGINT drains (no new work; running remediations stop at their next safe point, journaled
//! for the resume), a second one aborts at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { flag: Arc::new(AtomicBool::new(false)), tx: Arc::new(watch::channel(false).0) }
    }
}

impl Shutdown {
    /// A shutdown that only [`Shutdown::stop`] triggers (tests, embedding).
    pub fn new() -> Self {
        Self::default()
    }

    /// A shutdown the process's signals trigger: the first drains and says `draining`,
    /// the second exits at once with 130.
    pub fn on_signals(draining: &'static str) -> Self {
        let s = Self::new();
        let first = s.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                tracing::error!("cannot handle SIGTERM/SIGINT: a signal stops the agent without draining");
                return;
            };
            let next = async {
                tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                }
            };
            let sig = next.await;
            tracing::info!(signal = sig, "shutting down: {draining}; a second signal aborts");
            eprintln!("{sig}: {draining} (a second signal aborts)");
            first.stop();
            let sig = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            eprintln!("{sig} again: aborting");
            std::process::exit(130);
        });
        s
    }

    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
    }

    pub fn stopping(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The flag the engine checks at each safe point.
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// Resolves once a shutdown began.
    pub async fn stopped(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}
