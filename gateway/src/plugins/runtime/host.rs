//! A plugin store's data, [`HostState`], and all a guest may import: the
//! host interface it implements (`log`, the clocks, `params`), and the few
//! WASI interfaces [`link_wasi`] gives, every other import trapping.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, error, info, trace, warn};
use wasmtime::component::{Component, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::limits::{Limits, PluginLimiter};
use crate::plugins::wit::bindings::capteurs::plugins::host::{self, Level};
use crate::plugins::wit::bindings::capteurs::plugins::types::{self, ParamParam, ParamResult};

/// A store's data: the plugin's name and parameters, its (empty) WASI
/// context, its memory limiter.
pub struct HostState {
    pub name: Arc<str>,
    pub params: Vec<(String, String)>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: PluginLimiter,
    started: Instant,
}

impl HostState {
    pub fn new(
        name: Arc<str>,
        params: Vec<(String, String)>,
        env: &[(String, String)],
        limits: &Limits,
    ) -> Self {
        HostState {
            name,
            params,
            // Grants nothing but the environment the config gives it: no
            // preopened directory, no arguments, no network; stdio goes
            // nowhere.
            wasi: WasiCtx::builder().envs(env).build(),
            table: ResourceTable::new(),
            limits: PluginLimiter::new(limits.memory_bytes),
            started: Instant::now(),
        }
    }

    /// The parameters as `init` takes them (borrowed from `params`).
    pub fn init_params(params: &[(String, String)]) -> Vec<ParamParam<'_>> {
        params
            .iter()
            .map(|(key, value)| ParamParam { key, value })
            .collect()
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let plugin = &*self.name;
        let message = if message.len() > 1024 {
            format!("{}…", &message[..message.floor_char_boundary(1024)])
        } else {
            message
        };
        match level {
            Level::Trace => trace!(plugin, "{message}"),
            Level::Debug => debug!(plugin, "{message}"),
            Level::Info => info!(plugin, "{message}"),
            Level::Warn => warn!(plugin, "{message}"),
            Level::Error => error!(plugin, "{message}"),
        }
    }

    fn monotonic_ns(&mut self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn wall_ms(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn params(&mut self) -> Vec<ParamResult> {
        self.params
            .iter()
            .map(|(key, value)| ParamResult {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    }
}

/// The WASI a plugin may use, and nothing more. A std guest imports a dozen
/// WASI interfaces: random numbers (std's `HashMap` needs them), the wall
/// clock, its (empty) environment and `exit` are given; everything else —
/// files, sockets, stdio streams, polling — is linked as a function that
/// traps, so a plugin that tries it faults (printing is `host.log`, time is
/// `host.monotonic-ns`). wasmtime-wasi's synchronous stream and poll
/// functions would also block on a Tokio runtime from inside the gateway's
/// own, which panics: they must never be reachable.
pub fn link_wasi(
    linker: &mut wasmtime::component::Linker<HostState>,
    component: &Component,
) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::WasiCli;
    use wasmtime_wasi::clocks::WasiClocks;
    use wasmtime_wasi::p2::bindings::{cli, clocks, random};
    use wasmtime_wasi::random::WasiRandom;
    use wasmtime_wasi::{cli::WasiCliView, clocks::WasiClocksView};
    let l = linker;
    clocks::wall_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    random::random::add_to_linker::<HostState, WasiRandom>(l, |t| t.wasi.random())?;
    random::insecure::add_to_linker::<HostState, WasiRandom>(l, |t| t.wasi.random())?;
    random::insecure_seed::add_to_linker::<HostState, WasiRandom>(l, |t| t.wasi.random())?;
    cli::environment::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::exit::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    // Everything else the component imports: traps. (Linker's own
    // define_unknown_imports_as_traps matches names exactly, so it would
    // shadow the interfaces above when the guest's WASI version differs
    // from wasmtime-wasi's by a patch level.)
    const GIVEN: &[&str] = &[
        "capteurs:plugins/",
        "wasi:random/random@",
        "wasi:random/insecure@",
        "wasi:random/insecure-seed@",
        "wasi:clocks/wall-clock@",
        "wasi:cli/environment@",
        "wasi:cli/exit@",
    ];
    let engine = l.engine().clone();
    for (name, item) in component.component_type().imports(&engine) {
        if GIVEN.iter().any(|g| name.starts_with(g)) {
            continue;
        }
        let wasmtime::component::types::ComponentItem::ComponentInstance(instance) = item.ty else {
            continue;
        };
        let mut inst = l.instance(name)?;
        for (export, item) in instance.exports(&engine) {
            match item.ty {
                wasmtime::component::types::ComponentItem::ComponentFunc(_) => {
                    let what = format!("{name}#{export}");
                    inst.func_new(export, move |_, _, _, _| {
                        Err(wasmtime::Error::msg(format!(
                            "{what} is not available to plugins (use the host interface: log, monotonic-ns, wall-ms)"
                        )))
                    })?;
                }
                wasmtime::component::types::ComponentItem::Resource(_) => {
                    inst.resource(
                        export,
                        wasmtime::component::ResourceType::host::<()>(),
                        |_, _| Ok(()),
                    )?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}
