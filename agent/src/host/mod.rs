//! The node itself: its mount table, its processes, and the one module that touches a
//! tenant's volume (by descriptors proven once).

pub mod mounts;
pub mod podlogs;
pub mod processes;
pub mod volume;
