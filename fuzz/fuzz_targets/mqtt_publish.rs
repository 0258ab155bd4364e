//! What a broker delivers to the MQTT front end (topic, response topic, correlation data,
//! payload, the duplicate flag), handled by the real front end on the tiny fixture model: an
//! answer or nothing, never a panic.
#![no_main]

use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qwen2_edge::service::fuzzing::{
    fixture_bundle, mqtt_front, MqttFront, Publish, PublishProperties, QoS,
};

#[derive(Debug, Arbitrary)]
enum Topic {
    Request,
    Cancel,
    Reload,
    Other(String),
}

#[derive(Debug, Arbitrary)]
struct Input {
    topic: Topic,
    response_topic: Option<String>,
    correlation: Option<Vec<u8>>,
    payload: Vec<u8>,
    dup: bool,
}

fn front() -> &'static Mutex<MqttFront> {
    static F: OnceLock<Mutex<MqttFront>> = OnceLock::new();
    F.get_or_init(|| {
        let bundle = fixture_bundle();
        let (front, _) = mqtt_front(&bundle).expect("the front end on the fixture model");
        Mutex::new(front)
    })
}

fuzz_target!(|input: Input| {
    let topic = match input.topic {
        Topic::Request => "qwen2-edge/request".to_string(),
        Topic::Cancel => "qwen2-edge/cancel".to_string(),
        Topic::Reload => "qwen2-edge/reload".to_string(),
        Topic::Other(t) => t,
    };
    let properties = PublishProperties {
        response_topic: input.response_topic,
        correlation_data: input.correlation.map(Into::into),
        ..PublishProperties::default()
    };
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, input.payload, Some(properties));
    publish.dup = input.dup;
    let mut front = front().lock().unwrap_or_else(|e| e.into_inner());
    front.publish(publish);
});
