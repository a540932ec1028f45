//! Home Assistant MQTT discovery: every quantity of every registered sensor
//! announces itself, retained, on `<prefix>/sensor/<id>_<grandeur>/config`,
//! so it appears in Home Assistant with no YAML. Its availability follows
//! the gateway's status topic (`online` / `offline`), which the gateway also
//! keeps retained on its own broker.

use serde_json::json;

use crate::broker::Publisher;
use crate::message::{Message, Origin, QoS};
use crate::sources::registry::{self, Payload, Registry, SourceKey};

/// Home Assistant's device class of a quantity, where it has one.
pub fn device_class(grandeur: &str) -> Option<&'static str> {
    Some(match grandeur {
        "temperature" | "point_de_rosee" => "temperature",
        "humidite" | "humidite_sol" => "humidity",
        "pression" => "pressure",
        "batterie" => "battery",
        "tension" => "voltage",
        "co2" => "carbon_dioxide",
        "luminosite" => "illuminance",
        "pm25" => "pm25",
        "pm10" => "pm10",
        _ => return None,
    })
}

/// The discovery messages: (topic, JSON config) for each sensor quantity.
pub fn configs(
    registry: &Registry,
    prefix: &str,
    gateway_id: &str,
    status_topic: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in &registry.sensors {
        let id = registry::id_level(&s.id);
        let model = match s.source {
            SourceKey::Serial(_) => "serial sensor",
            SourceKey::Ble(_) => "BLE sensor",
        };
        let device = json!({
            "identifiers": [format!("capteurs_{gateway_id}_{id}")],
            "name": s.id,
            "manufacturer": "Capteurs",
            "model": model,
            "suggested_area": s.place[2],
            "via_device": format!("capteurs_{gateway_id}"),
        });
        for q in &s.quantities {
            let object = format!("{id}_{}", q.grandeur);
            let mut c = json!({
                "name": q.grandeur,
                "unique_id": format!("capteurs_{gateway_id}_{object}"),
                "object_id": object,
                "state_topic": q.topic,
                "state_class": "measurement",
                "availability_topic": status_topic,
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": device,
            });
            if let Some(class) = device_class(&q.grandeur) {
                c["device_class"] = class.into();
            }
            let unit = registry::unit(&q.grandeur);
            if !unit.is_empty() {
                c["unit_of_measurement"] = unit.into();
            }
            if s.payload == Payload::Json {
                c["value_template"] = "{{ value_json.value }}".into();
            }
            out.push((format!("{prefix}/sensor/{object}/config"), c.to_string()));
        }
    }
    out
}

/// Publishes the discovery messages (retained, QoS 1) on the local broker.
pub fn announce(
    publisher: &Publisher,
    registry: &Registry,
    prefix: &str,
    gateway_id: &str,
    status_topic: &str,
) -> usize {
    let configs = configs(registry, prefix, gateway_id, status_topic);
    let n = configs.len();
    for (topic, body) in configs {
        // Topics made from the checked config; a refusal is counted by the broker.
        let _ = publisher.publish(Message::new(
            topic,
            body,
            QoS::AtLeastOnce,
            true,
            Origin::Broker,
        ));
    }
    tracing::info!(
        sensors = registry.sensors.len(),
        configs = n,
        prefix,
        "Home Assistant discovery announced"
    );
    n
}

/// The gateway's own status (`online` / `offline`), retained on its broker.
pub fn status(publisher: &Publisher, status_topic: &str, state: &'static str) {
    // Topics made from the checked config; a refusal is counted by the broker.
    let _ = publisher.publish(Message::new(
        status_topic.to_owned(),
        state,
        QoS::AtLeastOnce,
        true,
        Origin::Broker,
    ));
}
