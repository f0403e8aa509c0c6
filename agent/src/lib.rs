//! etcd-medic: a node-level agent that heals etcd members stuck in
//! `etcdserver: member not found` crash loops. See the README and DESIGN.md.
//!
//! The contract and every decision live in `etcd-medic-core`; this crate observes and acts
//! on the node: `host` (mounts, processes, the volume, pod logs), `locate`, `diagnose`,
//! `quarantine`, `journal`, `etcd`, `kubeapi`, `lease`, the `engine` and the `server`.

pub mod cli;
pub mod commands;
pub mod controller;
pub mod data;
pub mod diagnose;
pub mod engine;
pub mod etcd;
pub mod failpoint;
pub mod host;
pub mod identity;
pub mod journal;
pub mod kubeapi;
pub mod lease;
pub mod locate;
pub mod profile;
pub mod quarantine;
pub mod rebuild;
pub mod recovery;
pub mod scope;
pub mod server;
pub mod shutdown;
pub mod telemetry;

pub use error::{Code, Error, Result};
pub use etcd_medic_core::{self as core, error};
