//! MQTT over TLS with a client certificate and a user name / password from the config:
//! mosquitto gets a TLS listener that requires both; certificates are made here with the
//! `openssl` command line (a throwaway CA, valid for two days).

use crate::service_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use service_support::mqtt::{Broker, Client, Version};
use service_support::{now_nanos, Server, Spec};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CA, server certificate for 127.0.0.1 and a client certificate, all EC P-256.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=qwen2-edge test CA",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for (name, subject) in [("server", "/CN=127.0.0.1"), ("client", "/CN=qwen2-edge")] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let ext = format!("{name}.ext");
        let mut req = vec!["req", "-subj", subject];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ],
        );
    }
}

#[test]
fn tls_with_client_certificate_and_password() {
    let test = "tls_with_client_certificate_and_password";
    if Command::new("openssl").arg("version").output().is_err() {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: openssl is required in CI");
        }
        eprintln!("{test} skipped: openssl not installed");
        return;
    }
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    // The plain listener stays open to anonymous test clients; the TLS one wants a client
    // certificate signed by our CA and a password.
    let Some(broker) = Broker::start_with(test, "per_listener_settings true\n", &|dir| {
        make_certificates(dir);
        let status = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(dir.join("passwd"))
            .args(["edge", "s3cret"])
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success());
        format!(
            "listener {tls_port} 127.0.0.1\n\
             cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
             require_certificate true\n\
             allow_anonymous false\npassword_file {d}/passwd\n",
            d = dir.display()
        )
    }) else {
        return;
    };
    let d = broker.dir.0.clone();
    std::fs::write(d.join("password.txt"), "s3cret\n").expect("password file");
    let mut spec = Spec::tiny().no_socket().mqtt(vec![
        format!("url = \"mqtts://127.0.0.1:{tls_port}\""),
        format!("ca_file = {:?}", d.join("ca.pem").display().to_string()),
        format!(
            "client_cert_file = {:?}",
            d.join("client.pem").display().to_string()
        ),
        format!(
            "client_key_file = {:?}",
            d.join("client.key").display().to_string()
        ),
        "username = \"edge\"".into(),
        format!(
            "password_file = {:?}",
            d.join("password.txt").display().to_string()
        ),
        "reconnect_initial_ms = 100".into(),
        "reconnect_max_ms = 500".into(),
    ]);
    spec.status_port = Some(broker.port);
    // Start-up waits for the service's "online", which it can only publish over TLS.
    let _server = Server::start(&spec);
    let id = format!("tls-{}", now_nanos());
    let mut c = Client::connect(broker.port, Version::V5, &id, false);
    let reply = format!("test/{id}/reply");
    c.subscribe(&reply);
    let request = json!({"op": "generate", "id": "t", "prompt": "hello", "max_tokens": 4});
    c.request("qwen2-edge", &request, &reply);
    let events = c.inbox.until_terminal("t", Duration::from_secs(20));
    assert_eq!(events.last().expect("done")["event"], "done", "{events:?}");
    // The service really came in over TLS, as user `edge`.
    let log = broker.log();
    assert!(log.contains(&format!("on port {tls_port}")), "{log}");
    assert!(
        log.contains("as qwen2-edge") && log.contains("u'edge'"),
        "{log}"
    );
}
