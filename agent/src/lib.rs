//! etcd-medic: a node-level agent that heals etcd members stuck in
//! `etcdserver: member not found` crash loops. See the README and DESIGN.md.

pub mod cli;
pub mod error;
pub mod guard;
pub mod kubeapi;
pub mod locate;
pub mod pathsafe;
pub mod profile;
pub mod quarantine;
pub mod telemetry;

pub use error::{Code, Error, Result};
