//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, off in every build but
//! theirs): parsers of untrusted input that live in private modules, and an MQTT front end on a
//! real model whose client never connects.

use std::path::Path;

use anyhow::{anyhow, Result};

use crate::config::ServiceConfig;

pub use super::http::fuzz_openai_body as openai_body;
pub use super::mqtt::FuzzFront as MqttFront;
pub use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
pub use rumqttc::v5::mqttbytes::QoS;

/// An MQTT front end on the bundle at `bundle` (small limits: a request generates at most 4
/// tokens, 4 may wait), with `allow_reload` on; and the config it was built from.
pub fn mqtt_front(bundle: &Path) -> Result<(MqttFront, ServiceConfig)> {
    let config = ServiceConfig::parse(&format!(
        "[model]\nbundle = {:?}\nverify = false\n\
         [limits]\nmax_new_tokens = 4\nmax_queue = 4\nmax_request_bytes = 65536\n\
         [unix_socket]\npath = \"\"\n[mqtt]\nallow_reload = true\n",
        bundle.display().to_string()
    ))
    .map_err(|e| anyhow!("{e}"))?;
    let ctx = super::start_scheduler(&config)?;
    let section = config.mqtt.clone().ok_or_else(|| anyhow!("no [mqtt]"))?;
    let front = MqttFront::new(ctx, &section, config.limits.max_request_bytes)?;
    Ok((front, config))
}
