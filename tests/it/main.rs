//! The integration tests, one binary: each module is one area (what was one test file). One
//! binary links ONNX Runtime, tract and the crate once instead of once per file.

mod common;
mod service_support;

mod backend_agreement;
mod batching;
mod chat_template;
mod cli;
mod demo;
mod fuzz_seeds;
mod generate;
mod kernels;
mod model_store;
mod native_demo;
mod native_quantized;
mod onnx_backends;
mod ort_runtime;
mod perplexity;
mod reference_logits;
mod sampling;
mod service_demo;
mod service_http;
mod service_lifecycle;
mod service_models;
mod service_mqtt;
mod service_mqtt_tls;
mod service_reload;
mod service_security;
mod service_uds;
mod signed_bundles;
mod speculative;
mod structured;
mod systemd_units;
mod tokenizer;
