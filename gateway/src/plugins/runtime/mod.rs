//! What every plugin kind shares: the wasmtime engine (epoch ticker for
//! deadlines), the on-disk cache of compiled components, and the store
//! state with its host imports (`log`, clocks, `params`) and limits.
//!
//! This file holds the public surface: [`PluginError`], [`TICK`], the
//! `guarded_world!` macro each plugin kind builds its world with, and the
//! re-exports of the parts, in the order a plugin meets them:
//! - `engine.rs`: the engines, compiling a component through the on-disk
//!   cache ([`load`]);
//! - `host.rs`: the store state [`HostState`], the host imports and the
//!   WASI given to a guest ([`link_wasi`]);
//! - `limits.rs`: [`Limits`] and the store's [`PluginLimiter`];
//! - `guarded.rs`: [`Guarded`], the instance kept across calls, its faults,
//!   restarts and [`PluginStats`].

mod engine;
mod guarded;
mod host;
mod limits;

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub use engine::{engine, load};
pub use guarded::{Fault, GuardSettings, Guarded, Instantiate, PluginStats};
pub use host::{link_wasi, HostState};
pub use limits::{Limits, PluginLimiter};

#[derive(Debug, Error)]
pub enum PluginError {
    #[error("plugin {name}: cannot read {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin {name}: {path} is not a valid component: {reason}")]
    Compile {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("plugin {name}: {reason}")]
    Link { name: String, reason: String },
    #[error("plugin {name}: init failed: {reason}")]
    Init { name: String, reason: String },
    #[error("wasmtime engine: {0}")]
    Engine(String),
}

/// One epoch tick: deadlines are counted in these.
pub const TICK: Duration = Duration::from_millis(1);

/// Links a world's bindings (`$World`, `$Pre`) for `$component`, and
/// returns it [`Guarded`]: every (re)instantiation calls the interface's
/// `init` (`$iface`: the generated accessor) with the plugin's parameters.
/// One macro for the three worlds, whose generated types share no trait.
macro_rules! guarded_world {
    ($engine:expr, $component:expr, $guard:expr, $World:ty, $Pre:ty, $iface:ident) => {
        $crate::plugins::runtime::guarded_world!(
            $engine,
            $component,
            $guard,
            $World,
            $Pre,
            $iface,
            std::convert::identity
        )
    };
    // `$wrap` turns the instantiated world into what the Guarded holds.
    ($engine:expr, $component:expr, $guard:expr, $World:ty, $Pre:ty, $iface:ident, $wrap:expr) => {{
        let guard: $crate::plugins::runtime::GuardSettings = $guard;
        let link = |e: wasmtime::Error| $crate::plugins::runtime::PluginError::Link {
            name: guard.name.clone(),
            reason: format!("{e:#}"),
        };
        let mut linker: wasmtime::component::Linker<$crate::plugins::runtime::HostState> =
            wasmtime::component::Linker::new($engine);
        <$World>::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(link)?;
        $crate::plugins::runtime::link_wasi(&mut linker, $component).map_err(link)?;
        let pre = linker.instantiate_pre($component).map_err(link)?;
        let pre = <$Pre>::new(pre).map_err(link)?;
        $crate::plugins::runtime::Guarded::new(
            $engine,
            guard,
            Box::new(
                move |store: &mut wasmtime::Store<$crate::plugins::runtime::HostState>| {
                    let plugin = pre
                        .instantiate(&mut *store)
                        .map_err(|e| format!("instantiate: {e:#}"))?;
                    let owned = store.data().params.clone();
                    let params = $crate::plugins::runtime::HostState::init_params(&owned);
                    match plugin.$iface().call_init(&mut *store, &params) {
                        Ok(Ok(())) => Ok($wrap(plugin)),
                        Ok(Err(e)) => Err(format!("init returned an error: {e}")),
                        Err(e) => Err(format!("init trapped: {e:#}")),
                    }
                },
            ),
        )
    }};
}
pub(crate) use guarded_world;
