//! Octopus center: the management center (see ARCHITECTURE.md).
pub mod api;
pub mod auth;
pub mod caps;
pub mod center;
pub mod content;
pub mod hosts;
pub mod https;
pub mod limits;
mod redb_store;
pub mod store;
pub mod target;
pub mod zk;
