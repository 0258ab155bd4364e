//! The MQTT side of `qwen2-edge ask`: one request with an MQTT 5 response topic of our own,
//! events handed back until the request's `done` or `error`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions};

use crate::config::MqttSection;
use crate::service::client::{cancel_line, clock_nanos};
use crate::service::protocol::Event;

/// Sends `request` (whose id is `id`) and calls `on_event` with every event for it until it
/// returns true (the terminal event). Ctrl-C sends a cancel and keeps waiting for the end.
///
/// With `wait_online`, the request is held back until the service's retained status says
/// `online` (a request published before the service ever subscribed would be lost), and an
/// error is returned if it does not within that time.
pub async fn exchange(
    section: &MqttSection,
    request: &str,
    id: &str,
    wait_online: Option<Duration>,
    on_event: &mut dyn FnMut(&Event) -> bool,
) -> Result<()> {
    let nanos = clock_nanos() % 1_000_000_000;
    let client_id = format!("qwen2-edge-ask-{}-{nanos}", std::process::id());
    let (client, mut eventloop) = AsyncClient::new(options(section, &client_id)?, 16);
    let client = &client;
    let reply_topic = format!("{}/reply/{client_id}", section.topic_prefix);
    let status_topic = section.status_topic();
    let mut subscribed = false;
    let mut acked_subscriptions = 0;
    let mut online = wait_online.is_none();
    let deadline = tokio::time::Instant::now() + wait_online.unwrap_or_default();
    let mut sent = false;
    let mut interrupted = false;
    loop {
        if !sent && online && acked_subscriptions == 1 + usize::from(wait_online.is_some()) {
            sent = true;
            let props = PublishProperties {
                correlation_data: Some(id.as_bytes().to_vec().into()),
                content_type: Some("application/json".into()),
                ..PublishProperties::default()
            };
            publish(
                client,
                section.request_topic(),
                request,
                &reply_topic,
                props,
            )
            .await
            .context("cannot publish the request")?;
        }
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = tokio::time::sleep_until(deadline), if !online && !sent => bail!(
                "the service is not online: no retained \"online\" on {status_topic} within {:.0} s",
                wait_online.unwrap_or_default().as_secs_f64()
            ),
            _ = tokio::signal::ctrl_c(), if sent && !interrupted => {
                interrupted = true;
                let props = PublishProperties::default();
                publish(client, section.cancel_topic(), &cancel_line(id), &reply_topic, props)
                    .await
                    .context("cannot send the cancel")?;
                continue;
            }
        };
        match event {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) if !subscribed => {
                subscribed = true;
                let status = wait_online.map(|_| status_topic.as_str());
                subscribe(client, &reply_topic, status).await?;
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(_))) => acked_subscriptions += 1,
            Ok(MqttEvent::Incoming(Packet::Publish(p))) if p.topic == status_topic.as_bytes() => {
                online = p.payload.as_ref() == b"online";
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                let Ok(event) = serde_json::from_slice::<Event>(&p.payload) else {
                    continue;
                };
                if event.id() != Some(id) {
                    continue;
                }
                if on_event(&event) {
                    disconnect(client, &mut eventloop).await;
                    return Ok(());
                }
            }
            Ok(_) => {}
            Err(e) => {
                if sent {
                    bail!("lost the connection to the MQTT broker before the answer was complete: {e}");
                }
                return Err(anyhow!(
                    "cannot reach the MQTT broker at {}: {e}",
                    section.url
                ));
            }
        }
    }
}

/// A clean session of our own; room for long answers.
fn options(section: &MqttSection, client_id: &str) -> Result<MqttOptions> {
    let mut options = super::base_options(section, client_id)?;
    options.set_clean_start(true);
    // Answers can be long and arrive in one `done` message; rumqttc's default limit is 10 KiB.
    options.set_max_packet_size(Some(64 * 1024 * 1024));
    Ok(options)
}

/// Lets the DISCONNECT go out (for up to a second; the answer is complete either way).
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// Publishes `payload` (QoS 1) with `reply_topic` as its MQTT 5 response topic.
async fn publish(
    client: &AsyncClient,
    topic: String,
    payload: &str,
    reply_topic: &str,
    props: PublishProperties,
) -> Result<(), rumqttc::v5::ClientError> {
    let props = PublishProperties {
        response_topic: Some(reply_topic.to_string()),
        ..props
    };
    client
        .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_string(), props)
        .await
}

/// Subscribes to our reply topic and, when waiting for the service, its status topic.
async fn subscribe(client: &AsyncClient, reply_topic: &str, status: Option<&str>) -> Result<()> {
    client
        .subscribe(reply_topic, QoS::AtLeastOnce)
        .await
        .context("cannot subscribe")?;
    if let Some(status) = status {
        client
            .subscribe(status, QoS::AtLeastOnce)
            .await
            .context("cannot subscribe to the status topic")?;
    }
    Ok(())
}
