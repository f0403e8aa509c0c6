//! etcd-medic: a node-level agent that heals etcd members stuck in
//! `etcdserver: member not found` crash loops. See the README and DESIGN.md.

pub mod api;
pub mod cli;
pub mod error;
pub mod etcd;
pub mod failpoint;
pub mod guard;
pub mod identity;
pub mod journal;
pub mod kubeapi;
pub mod lease;
pub mod locate;
pub mod pathsafe;
pub mod profile;
pub mod quarantine;
pub mod remediation;
pub mod telemetry;
pub mod volume;

pub use error::{Code, Error, Result};
