//! The wasmtime engines plugins run on (one with fuel metering, one
//! without, each with the thread that ticks its epoch for deadlines), and
//! compiling a component through the on-disk cache of compiled components.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

use super::{PluginError, TICK};

/// The engine plugins run on, created once per kind: component model on,
/// epoch interruption on (a thread ticks every [`TICK`]). Fuel metering
/// slows every instruction (~20 %), so only plugins that ask for a fuel
/// budget run on the engine that meters it (`fuel = true`).
pub fn engine(fuel: bool) -> Result<Engine, PluginError> {
    static PLAIN: OnceLock<Result<Engine, String>> = OnceLock::new();
    static FUELED: OnceLock<Result<Engine, String>> = OnceLock::new();
    let cell = if fuel { &FUELED } else { &PLAIN };
    cell.get_or_init(|| {
        let mut c = Config::new();
        c.wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(fuel);
        let engine = Engine::new(&c).map_err(|e| e.to_string())?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                match ticker.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => return,
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(engine)
    })
    .clone()
    .map_err(PluginError::Engine)
}

/// The compiled form of `path`, from the cache when the gateway compiled
/// this very file (same SHA-256) with this very engine before; otherwise
/// compiled now and cached. Only files the gateway wrote are deserialized.
pub fn load(
    engine: &Engine,
    name: &str,
    path: &Path,
    cache: Option<&Path>,
) -> Result<Component, PluginError> {
    let bytes = std::fs::read(path).map_err(|source| PluginError::Read {
        name: name.into(),
        path: path.to_owned(),
        source,
    })?;
    let compile_error = |e: wasmtime::Error| PluginError::Compile {
        name: name.into(),
        path: path.to_owned(),
        reason: format!("{e:#}"),
    };
    let Some(cache) = cache else {
        return Component::new(engine, &bytes).map_err(compile_error);
    };
    let mut compat = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let digest = Sha256::digest(&bytes);
    let key: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let file = cache.join(format!("{key}-{:016x}.cwasm", compat.finish()));
    if file.exists() {
        let started = Instant::now();
        // SAFETY: the file is in the gateway's own cache directory, written
        // by `serialize` below for this engine configuration (the name
        // carries the compatibility hash), never by anyone else.
        match unsafe { Component::deserialize_file(engine, &file) } {
            Ok(c) => {
                debug!(
                    plugin = name,
                    took_us = started.elapsed().as_micros() as u64,
                    "compiled plugin loaded from the cache"
                );
                return Ok(c);
            }
            Err(e) => {
                warn!(plugin = name, file = %file.display(), error = %e, "cached plugin unusable; compiling again");
                let _ = std::fs::remove_file(&file);
            }
        }
    }
    let started = Instant::now();
    let component = Component::new(engine, &bytes).map_err(compile_error)?;
    info!(
        plugin = name,
        took_ms = started.elapsed().as_millis() as u64,
        "plugin compiled"
    );
    match component.serialize() {
        Ok(compiled) => {
            let tmp = file.with_extension("tmp");
            let written = std::fs::create_dir_all(cache)
                .and_then(|_| std::fs::write(&tmp, compiled))
                .and_then(|_| std::fs::rename(&tmp, &file));
            if let Err(e) = written {
                warn!(plugin = name, dir = %cache.display(), error = %e, "cannot cache the compiled plugin");
            }
        }
        Err(e) => warn!(plugin = name, error = %e, "cannot serialize the compiled plugin"),
    }
    Ok(component)
}
