//! The subcommands of `capteurs-gateway` beside running the gateway (which
//! stays in `main.rs` with the argument parsing).

pub mod plugin;
pub mod status;
