//! rumqttc connection options from the `[mqtt]` section: broker address, TLS files,
//! credentials, persistent session, last will, packet size limits. Files are read here, at
//! start-up, so a missing certificate is a start-up error rather than an endless reconnect.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use rumqttc::{NetworkOptions, Transport};

use crate::config::MqttSection;

/// Where Debian and its derivatives keep the system's CA bundle (mqtts:// without ca_file).
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The largest MQTT packet there is (remaining length of 268,435,455 bytes).
const MQTT_MAX_PACKET: usize = 268_435_455;

/// Options for the service's own connection.
pub fn service_options(m: &MqttSection, max_request_bytes: usize) -> Result<MqttOptions> {
    let mut o = base_options(m, &m.client_id)?;
    // A persistent session: the broker keeps the subscription and queues QoS 1 requests
    // while the service is away (restart, upgrade), and resends unacknowledged ones.
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(m.session_expiry_s));
    // Requests are acknowledged only once they are accepted or answered, so a crash between
    // receipt and acceptance makes the broker deliver them again.
    o.set_manual_acks(true);
    // Up to twice the request limit comes in, so that an oversized request is answered with
    // a `too_long` error instead of being dropped by the broker without a word; beyond that
    // the broker drops it (MQTT 5 maximum packet size), never our connection.
    let limit = max_request_bytes
        .saturating_mul(2)
        .saturating_add(64 * 1024)
        .min(MQTT_MAX_PACKET);
    o.set_max_packet_size(Some(limit as u32));
    o.set_last_will(LastWill::new(
        m.status_topic(),
        "offline",
        QoS::AtLeastOnce,
        true,
        None,
    ));
    Ok(o)
}

/// Options shared by the service and the `ask` client: address, TLS, credentials.
pub fn base_options(m: &MqttSection, client_id: &str) -> Result<MqttOptions> {
    let broker = m.broker()?;
    let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_s.max(5)));
    // Small request/reply messages: Nagle's algorithm meeting the broker's delayed ACKs cost
    // ~90 ms per request on loopback.
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    o.set_network_options(network);
    if broker.tls {
        let ca_path = if m.ca_file.as_os_str().is_empty() {
            std::path::PathBuf::from(SYSTEM_CA_BUNDLE)
        } else {
            m.ca_file.clone()
        };
        let ca = std::fs::read(&ca_path).with_context(|| {
            format!(
                "mqtt.ca_file: cannot read {} (set mqtt.ca_file to the CA that signs the broker's certificate)",
                ca_path.display()
            )
        })?;
        let client_auth = if m.client_cert_file.as_os_str().is_empty() {
            None
        } else {
            let cert = read("client_cert_file", &m.client_cert_file)?;
            let key = read("client_key_file", &m.client_key_file)?;
            Some((cert, key))
        };
        o.set_transport(Transport::tls(ca, client_auth, None));
    }
    if !m.username.is_empty() {
        let password = if m.password_file.as_os_str().is_empty() {
            m.password.clone()
        } else {
            crate::service::first_line_of("mqtt.password_file", &m.password_file)?
        };
        o.set_credentials(m.username.clone(), password);
    }
    if client_id.is_empty() {
        bail!("mqtt.client_id must not be empty");
    }
    Ok(o)
}

/// The file `mqtt.<key>` names; the error names the key.
fn read(key: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("mqtt.{key}: cannot read {}", path.display()))
}
