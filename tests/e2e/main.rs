//! End-to-end tests: real MQTT clients (raw, paho-mqtt, mosquitto-clients)
//! over loopback TCP against the gateway. One test binary, as Vector does.

mod broker;
mod course;
mod hostile;
mod interop;
mod ops;
mod persistence;
mod plugins;
mod sensors;
mod service;
mod upstream;
