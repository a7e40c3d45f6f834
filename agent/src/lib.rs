//! Octopus agent: the daemon on every host (see ARCHITECTURE.md).
pub mod exec;
pub mod hostinfo;
pub mod daemon;
pub mod proto;
