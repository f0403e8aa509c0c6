//! The etcd-medic lab: the failure our users see, reproduced with real etcd.
//!
//! - [`etcd`]: real etcd members as processes on loopback;
//! - [`kubelet`]: a node's kubelet directory tree, with real mounts as root;
//! - [`apiserver`]: a stand-in Kubernetes API server;
//! - [`statefulset`]: a StatefulSet controller and kubelet that run the Bitnami image's
//!   start-up rules ([`bitnami`]) or a plain etcd;
//! - [`lab`]: all of it in one value;
//! - [`agent`]: etcd-medic's locator and engine on the lab's node, and the real agent
//!   (`etcd-medic serve`) as a process, reached with [`http`].

pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod bitnami;
pub mod controller;
pub mod etcd;
pub mod http;
pub mod kubelet;
pub mod lab;
pub mod objects;
pub mod process;
pub mod prometheus;
pub mod statefulset;

pub use lab::{Lab, LabOptions, NODE_NAME};

/// A test (or a part of one) that cannot run here says so, never passing in silence: a
/// `SKIPPED` line written past the test harness's output capture, and a failure where the
/// run requires every test to run (CI sets `ETCD_MEDIC_LAB_REQUIRE_MOUNTS`).
#[track_caller]
pub fn skip(why: &str) {
    use std::io::Write;
    let at = std::panic::Location::caller();
    if std::env::var_os(kubelet::REQUIRE_MOUNTS_ENV).is_some() {
        panic!("{}:{}: would be skipped ({why}), but {} requires every test to run", at.file(), at.line(), kubelet::REQUIRE_MOUNTS_ENV);
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {}:{}: {why}", at.file(), at.line());
}
