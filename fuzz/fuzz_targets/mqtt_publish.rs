//! What a broker delivers to the MQTT front end (topic, response topic, correlation data,
//! payload, the duplicate flag), handled by the real front end on the tiny fixture model: an
//! answer or nothing, never a panic.
//!
//! The input is four newline-ended header lines and the payload, so that seeds are readable
//! files a person writes (fuzz/seeds/mqtt_publish/):
//!
//! ```text
//! TOPIC            (bytes, taken as the publish's topic as they are)
//! RESPONSE TOPIC   (empty: none)
//! CORRELATION DATA (empty: none)
//! FLAGS            (contains `d`: the duplicate flag is set)
//! PAYLOAD...       (the rest, newlines included)
//! ```
//!
//! Inputs with fewer lines leave the missing parts empty.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use qwen2_edge::service::fuzzing::{
    fixture_bundle, mqtt_front, MqttFront, Publish, PublishProperties, QoS,
};

fn front() -> &'static Mutex<MqttFront> {
    static F: OnceLock<Mutex<MqttFront>> = OnceLock::new();
    F.get_or_init(|| {
        let bundle = fixture_bundle();
        let (front, _) = mqtt_front(&bundle).expect("the front end on the fixture model");
        Mutex::new(front)
    })
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(5, |&b| b == b'\n');
    let mut next = || parts.next().unwrap_or_default();
    let topic = next().to_vec();
    let response_topic = next();
    let correlation = next();
    let flags = next();
    let payload = next().to_vec();
    let properties = PublishProperties {
        // A broker hands on a response topic only as UTF-8 (MQTT 5's UTF-8 string).
        response_topic: (!response_topic.is_empty())
            .then(|| String::from_utf8_lossy(response_topic).into_owned()),
        correlation_data: (!correlation.is_empty()).then(|| correlation.to_vec().into()),
        ..PublishProperties::default()
    };
    let mut publish = Publish::new("", QoS::AtLeastOnce, payload, Some(properties));
    // Raw bytes, not only UTF-8: the front end must cope with whatever the client library hands on.
    publish.topic = topic.into();
    publish.dup = flags.contains(&b'd');
    let mut front = front().lock().unwrap_or_else(|e| e.into_inner());
    front.publish(publish);
});
