//! qwen2-edge: an inference engine for small Qwen2-family models on edge boxes.
//!
//! Layout (docs/architecture.md, "Layers and module map"): `bundle` reads and verifies a
//! model bundle, `chat` is a conversation's messages, `tokenizer` turns text and chats into
//! tokens and back, `sampling` picks tokens from logits, `generate` runs the loop, `guide` constrains its output (JSON schema, grammars, tool calls), and
//! `backend` is the seam to whatever computes the logits. `engine` ties a bundle, its
//! tokenizer and a backend together for the front ends, and `bench` measures them; `signature`
//! checks a bundle's Ed25519 signature against the keys a box trusts, `store` installs verified
//! bundle versions and switches between them. `service`
//! is the daemon (scheduler, Unix socket and MQTT front ends) with its TOML config and the
//! precedence of settings in `config`.

#[macro_use]
mod names;

pub mod backend;
pub mod bench;
pub mod bundle;
pub mod chat;
pub mod config;
pub mod draft;
pub mod engine;
pub mod generate;
pub mod guide;
pub mod lookup;
pub mod perplexity;
pub mod sampling;
pub mod service;
pub mod signature;
pub mod store;
pub mod tokenizer;
