//! etcd-medic's core: the contract (the types a controller, the kubectl plugin and the agent
//! share) and every decision the engine makes, as pure functions over hand-built values.
//! No I/O, no Kubernetes client, no async runtime: the agent observes and acts, this
//! crate decides, and its tests run without a cluster, a server or a node.

pub mod bolt;
pub mod contract;
pub mod data;
pub mod detect;
pub mod duration;
pub mod error;
pub mod flags;
pub mod generation;
pub mod lease;
pub mod member;
pub mod names;
pub mod profile;
pub mod progress;
pub mod quorum;
pub mod recover;
pub mod request;
pub mod resume;
pub mod retention;
pub mod signature;
pub mod step;
pub mod verify;
pub mod wal;

pub use contract::{Outcome, Phase, Remediation, Step};

pub use error::{Code, Error, Problem, Result};

/// What the readers' tests share.
#[cfg(test)]
mod testing {
    /// `len` bytes from a xorshift stream seeded (and advanced) by `seed`: repeatable junk.
    pub fn junk(seed: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                *seed as u8
            })
            .collect()
    }
}
