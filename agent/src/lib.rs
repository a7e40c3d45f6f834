//! Octopus agent: the daemon on every host (see ARCHITECTURE.md).
pub mod cache;
mod cgroup;
pub mod daemon;
pub mod exec;
pub mod fetch;
pub mod hostinfo;
pub mod pool;
pub mod proto;
pub mod serve;
pub mod urlsig;
