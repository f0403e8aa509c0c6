//! Test hooks, compiled in only with the `failpoints` feature (the lab's build; never the
//! release binary): `ETCD_MEDIC_FAILPOINT=<name>`, read once at start into the engine's
//! options, holds the agent at that point, so the lab can kill it there (SIGKILL) and check
//! what a restart does. The names are `after:<Step>` (the step journaled as done; a graceful
//! stop still ends the hold at this safe point), `in:<Step>` (in the middle of a step that
//! changes something; only a kill ends it) and `panic:<Step>` (the engine's task panics as
//! the step starts: a bug, as the agent must survive one).

/// The variable the lab arms a hook with.
pub const VAR: &str = "ETCD_MEDIC_FAILPOINT";

/// The hook armed in this process, if any (always none without the `failpoints` feature).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failpoint(Option<String>);

impl Failpoint {
    pub const NONE: Failpoint = Failpoint(None);

    /// Read at start, at the edge: the engine is given the value.
    pub fn from_env() -> Self {
        Failpoint(if cfg!(feature = "failpoints") { std::env::var(VAR).ok().filter(|v| !v.is_empty()) } else { None })
    }

    /// Whether the hook `name` is armed.
    pub fn armed(&self, name: &str) -> bool {
        cfg!(feature = "failpoints") && self.0.as_deref() == Some(name)
    }

    /// Holds this thread for good at an `in:` point (until the process is killed).
    pub fn hold(&self, name: &str) {
        if self.armed(name) {
            eprintln!("failpoint {name} reached: holding until killed");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }

    /// Panics at a `panic:` point.
    pub fn panic_at(&self, name: &str) {
        if self.armed(name) {
            panic!("failpoint {name}: a bug in the engine");
        }
    }
}
