//! The radio: BlueZ over D-Bus (`bluer`, BlueZ's own Rust binding — the
//! official API, maintained with BlueZ, no raw HCI sockets or root needed
//! beyond D-Bus policy). Kept thin on purpose: device properties in,
//! [`Advert`]s out; everything after is tested without a radio.
//!
//! Scanning uses an LE discovery session with duplicate data on (BlueZ
//! then reports every advert, not just the first), which on most
//! controllers is active scanning. BlueZ's advertisement monitor API (true
//! passive scanning) needs BlueZ's experimental features turned on in many
//! installs, so it is not used yet.

use std::sync::Arc;
use std::time::Duration;

use bluer::{AdapterEvent, DiscoveryFilter, DiscoveryTransport, UuidExt};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{advert, Advert, ScanSettings};
use crate::sources::Sources;

pub async fn scan(settings: ScanSettings, sources: Arc<Sources>, shutdown: CancellationToken) {
    loop {
        match run(&settings, &sources, &shutdown).await {
            Ok(()) => return,
            Err(e) => warn!(error = %e, "BLE scanning stopped; retrying in 10 s"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

async fn run(
    settings: &ScanSettings,
    sources: &Sources,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let err = |e: bluer::Error| e.to_string();
    let session = bluer::Session::new().await.map_err(err)?;
    let adapter = match &settings.adapter {
        Some(name) => session.adapter(name).map_err(err)?,
        None => session.default_adapter().await.map_err(err)?,
    };
    adapter.set_powered(true).await.map_err(err)?;
    adapter
        .set_discovery_filter(DiscoveryFilter {
            transport: DiscoveryTransport::Le,
            duplicate_data: true,
            ..Default::default()
        })
        .await
        .map_err(err)?;
    let events = adapter.discover_devices_with_changes().await.map_err(err)?;
    tokio::pin!(events);
    info!(adapter = adapter.name(), "BLE scanning");
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            e = events.next() => e,
        };
        match event {
            Some(AdapterEvent::DeviceAdded(addr)) => {
                let Ok(dev) = adapter.device(addr) else {
                    continue;
                };
                let service_data: Vec<(u16, Vec<u8>)> = dev
                    .service_data()
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(uuid, data)| uuid.as_u16().map(|u| (u, data)))
                    .collect();
                let manufacturer_data: Vec<(u16, Vec<u8>)> = dev
                    .manufacturer_data()
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                if service_data.is_empty() && manufacturer_data.is_empty() {
                    continue;
                }
                let a = Advert {
                    mac: addr.0,
                    rssi: dev.rssi().await.ok().flatten(),
                    service_data,
                    manufacturer_data,
                };
                advert(sources, &a);
            }
            Some(_) => {}
            None => return Err("the discovery session ended".into()),
        }
    }
}
