//! Decoder plugins: serial lines and BLE frames the built-in decoders do
//! not know, turned into readings by a plugin (`decoder-plugin` world).
//! A `[[serial]]` port with `decoder = "<plugin>"` hands every line to it;
//! `[ble] decoder = "<plugin>"` gets the adverts no built-in format claims.

use std::sync::Arc;

use wasmtime::component::Component;
use wasmtime::Engine;

use super::runtime::{GuardSettings, Guarded, HostState, PluginError, PluginStats};
use super::wit::decoder_bindings::{DecoderPlugin as World, DecoderPluginPre};

/// One reading out of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub sensor: Option<String>,
    pub grandeur: String,
    pub value: f64,
}

pub struct Decoder {
    pub name: Arc<str>,
    guarded: Guarded<World>,
}

impl Decoder {
    pub fn new(
        engine: &Engine,
        component: &Component,
        guard: GuardSettings,
    ) -> Result<Decoder, PluginError> {
        let guarded = super::runtime::guarded_world!(
            engine,
            component,
            guard,
            World,
            DecoderPluginPre<HostState>,
            capteurs_plugins_decoder
        )?;
        Ok(Decoder {
            name: guarded.name.clone(),
            guarded,
        })
    }

    pub fn stats(&self) -> &Arc<PluginStats> {
        &self.guarded.stats
    }

    /// The readings in `data` (a line, or an advert's data), or why not.
    /// Values that are not finite make the whole output garbage.
    pub fn decode(&self, source: &str, data: &[u8]) -> Result<Vec<Decoded>, String> {
        if self.guarded.disabled() {
            return Err("disabled after repeated faults".into());
        }
        let out = self
            .guarded
            .call(|p, s| p.capteurs_plugins_decoder().call_decode(s, source, data))?;
        let checked = out
            .map_err(|e| format!("decode returned an error: {e}"))
            .and_then(|readings| {
                readings
                    .into_iter()
                    .map(|r| {
                        if r.value.is_finite() {
                            Ok(Decoded {
                                sensor: r.sensor,
                                grandeur: r.grandeur,
                                value: r.value,
                            })
                        } else {
                            Err(format!(
                                "returned a value that is not a number ({})",
                                r.value
                            ))
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
            });
        match checked {
            Ok(v) => {
                self.guarded.succeeded(v.len());
                Ok(v)
            }
            Err(e) => Err(self.guarded.failed(e)),
        }
    }
}
