//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, off in every build but
//! theirs): parsers of untrusted input that live in private modules, and an MQTT front end on a
//! real model whose client never connects.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Result};

use crate::config::ServiceConfig;
use crate::tokenizer::Tokenizer;

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

/// The tiny fixture model's bundle (tests/fixtures/tiny-tied), which the targets run on.
pub fn fixture_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-tied/bundle")
}

/// The fixture's tokenizer (a byte-level BPE with Qwen2.5's chat template), loaded once.
pub fn fixture_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = fixture_bundle();
        Tokenizer::from_files(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
        )
        .unwrap_or_else(|e| panic!("the fixture's tokenizer: {e:#}"))
    })
}
