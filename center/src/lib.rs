//! Octopus center: the management center (see ARCHITECTURE.md).
pub mod api;
pub mod auth;
pub mod caps;
pub mod center;
pub mod content;
mod redb_store;
pub mod store;
pub mod target;
pub mod zk;
