//! End-to-end tests of the lab against real etcd. One binary, one module per concern.
//! Mount tests need root (CI runs as root); without it they check the plain-directory
//! layout and say so.

mod api;
mod apiserver;
mod cluster;
mod controller;
mod diagnosis;
mod faults;
mod gates;
mod hostile;
mod kubelet;
mod locate;
mod monitoring;
mod plugin;
mod recover;
mod reference_failure;
mod remediate;
mod tenancy;

use std::sync::Once;

/// Logs of the lab itself (`RUST_LOG=debug` to see them).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    });
}
