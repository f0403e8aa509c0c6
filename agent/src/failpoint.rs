//! Test hooks, compiled in only with the `failpoints` feature (the lab's build; never the
//! release binary): `ETCD_MEDIC_FAILPOINT=<name>` holds the agent at that point, so the lab
//! can kill it there (SIGKILL) and check what a restart does. The names are `after:<Step>`
//! (the step journaled as done; a graceful stop still ends the hold at this safe point),
//! `in:<Step>` (in the middle of a step that changes something; only a kill ends it) and
//! `panic:<Step>` (the engine's task panics as the step starts: a bug, as the agent must
//! survive one).

/// Whether the hook `name` is armed in this process.
pub fn armed(name: &str) -> bool {
    cfg!(feature = "failpoints") && std::env::var("ETCD_MEDIC_FAILPOINT").is_ok_and(|f| f == name)
}

/// Holds this thread for good at an `in:` point (until the process is killed).
pub fn hold(name: &str) {
    if armed(name) {
        eprintln!("failpoint {name} reached: holding until killed");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Panics at a `panic:` point.
pub fn panic_at(name: &str) {
    if armed(name) {
        panic!("failpoint {name}: a bug in the engine");
    }
}
