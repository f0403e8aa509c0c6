//! Child processes that never outlive the lab, and loopback ports that do not collide.

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Ports handed out by this process: a port the kernel gave us once and that we released may
/// be given again to the next `bind(0)` before the member that owns it has bound it.
static HANDED_OUT: LazyLock<Mutex<HashSet<u16>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// A free TCP port on 127.0.0.1, never the same twice within this process.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind an ephemeral port on loopback").port();
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// Spawns `cmd` so that it dies with the thread that spawned it (PR_SET_PDEATHSIG): a test
/// that panics, or a lab killed by CI's timeout, leaves no etcd behind. Spawn from a
/// long-lived thread (a test's own thread or a runtime worker), never from `spawn_blocking`.
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
    }
    cmd.spawn()
}

/// SIGTERM, then SIGKILL after `grace`; always reaps the child.
pub async fn terminate(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            let _ = child.start_kill();
            child.wait().await.ok()
        }
    }
}

/// Kill and reap without an async context (for `Drop`).
pub fn kill_now(child: &mut Child) {
    let _ = child.start_kill();
    for _ in 0..200 {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
