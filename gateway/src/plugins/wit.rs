//! The bindings wasmtime generates from `wit/`, one module per world. The
//! `types` and `host` interfaces are generated once (in [`bindings`]) and
//! shared by the other worlds.

/// Bindings of the `transform-plugin` world; they also hold the shared
/// `types` and `host` interfaces every other world reuses.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "transform-plugin",
        path: "../wit",
        // The message goes in as borrowed topic and payload: no host-side
        // copies before the guest's own (it is lowered straight from ours).
        ownership: Borrowing {
            duplicate_if_necessary: true
        },
    });
}

/// A world that reuses the `types` and `host` interfaces of [`bindings`].
macro_rules! world {
    ($(#[$doc:meta])* $module:ident, $world:literal) => {
        $(#[$doc])*
        pub mod $module {
            wasmtime::component::bindgen!({
                world: $world,
                path: "../wit",
                ownership: Borrowing {
                    duplicate_if_necessary: true
                },
                with: {
                    "capteurs:plugins/types": crate::plugins::wit::bindings::capteurs::plugins::types,
                    "capteurs:plugins/host": crate::plugins::wit::bindings::capteurs::plugins::host,
                },
            });
        }
    };
}

world!(
    /// Bindings of the `batch-transform-plugin` world: `transform` and
    /// `transform-batch`.
    batch_bindings,
    "batch-transform-plugin"
);
world!(
    /// Bindings of the `auth-plugin` world.
    auth_bindings,
    "auth-plugin"
);
world!(
    /// Bindings of the `decoder-plugin` world.
    decoder_bindings,
    "decoder-plugin"
);
