//! The service's TOML config (`qwen2-edge serve --config FILE`): one struct per section, a
//! default for every key except `model.bundle`, and validation that names the offending key.
//!
//! Everything here is checked before the service loads a model or binds a socket, so a typo
//! fails in milliseconds with a usage error instead of after a slow start. Unknown keys are
//! errors (a misspelt key silently falling back to its default is the worse failure).
//! systemd/qwen2-edge.toml documents every key; keep the two in step.
//!
//! This module only describes settings: it opens no file other than the config itself.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{BackendKind, KvCacheType, LmHead};
use crate::signature::TrustedKey;

pub mod environment;
mod http;
mod mqtt;
pub use http::{HttpListen, HttpSection};
pub use mqtt::{BrokerAddress, MqttSection};

/// A config that cannot be used; the message names the key (`limits.max_queue: …`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(message.into()))
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// `[model]`, or `[[model]]` tables for several models (the first is the default).
    #[serde(rename = "model")]
    pub models: Models,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub unix_socket: UnixSocketSection,
    /// Absent: MQTT off.
    #[serde(default)]
    pub mqtt: Option<MqttSection>,
    /// Absent: HTTP off.
    #[serde(default)]
    pub http: Option<HttpSection>,
    #[serde(default)]
    pub cache: CacheSection,
    #[serde(default)]
    pub lifecycle: LifecycleSection,
    #[serde(default)]
    pub log: LogSection,
    /// `[ort]`: settings of the ort backend (ignored by the others); documented on `OrtOptions`.
    #[serde(default, skip_serializing)]
    pub ort: crate::backend::options::OrtOptions,
}

/// The models a service runs, in the config's order: one `[model]` table or several
/// `[[model]]` tables (a one-model config is written back as a table).
#[derive(Debug, Clone, PartialEq)]
pub struct Models(pub Vec<ModelSection>);

impl std::ops::Deref for Models {
    type Target = [ModelSection];
    fn deref(&self) -> &[ModelSection] {
        &self.0
    }
}

impl std::ops::DerefMut for Models {
    fn deref_mut(&mut self) -> &mut [ModelSection] {
        &mut self.0
    }
}

impl<'de> Deserialize<'de> for Models {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        struct OneOrMany;
        impl<'de> Visitor<'de> for OneOrMany {
            type Value = Models;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a [model] table or [[model]] tables")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Models, A::Error> {
                let one =
                    ModelSection::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Models(vec![one]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Models, A::Error> {
                let mut all = Vec::new();
                while let Some(m) = seq.next_element()? {
                    all.push(m);
                }
                Ok(Models(all))
            }
        }
        d.deserialize_any(OneOrMany)
    }
}

impl Serialize for Models {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

/// What a reload does with a model whose bundle or settings changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadStrategy {
    /// Load the new model next to the old one, switch, let the old one finish: no request
    /// waits, but both are in memory for a while.
    #[default]
    Overlap,
    /// Let the old model finish its requests (new ones get `busy`), free it, then load the new
    /// one: one model's memory, at the price of a pause.
    Swap,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// What requests call it (`"model"`); empty: from the bundle path (`<store>/<name>/current`
    /// → `<name>`, else the directory's name). Unique in the config.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub bundle: PathBuf,
    /// native | ort | tract (kept as text: the backend factory reports what this build has).
    #[serde(default = "default_backend")]
    pub backend: String,
    #[serde(default = "default_variant")]
    pub variant: String,
    /// 0 = one per core.
    #[serde(default)]
    pub threads: usize,
    /// Hash the bundle's files at start-up (false: sizes only, a faster start).
    #[serde(default = "yes")]
    pub verify: bool,
    /// Native kernel set: "auto", "generic" or a tier name (see `generate --kernels`).
    #[serde(default = "default_kernels")]
    pub kernels: String,
    /// Native KV cache element type: "f32" (exact), "f16" (half the memory) or "int8" (about
    /// a quarter).
    #[serde(default)]
    pub kv_cache: KvCacheType,
    /// Native LM head: "bundle" (as stored) or "int4" (an int8 head requantized to int4 at
    /// load: the 0.5B int4 decodes 14–21% faster in 57 MiB less for +1.8% perplexity; e.g. for
    /// a model that serves as another's `draft`, whose guesses are checked anyway).
    #[serde(default)]
    pub lm_head: LmHead,
    /// Native backend: map the weights file (true) or read it into memory (false: no SIGBUS
    /// if the file is truncated or the disk fails while running; the file's size in RAM).
    #[serde(default = "yes")]
    pub mmap: bool,
    /// Ed25519 public keys (`ed25519:<base64>`, or a file holding one, relative to the config
    /// file) of which one must have signed the bundle; empty: a signature is reported, not
    /// required.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// How a reload replaces this model: "overlap" or "swap".
    #[serde(default)]
    pub reload_strategy: ReloadStrategy,
    /// Speculative decoding with prompt lookup: up to this many tokens drafted from the
    /// request's own context after each token and verified in the same step (0 = off; at most
    /// 32). The output is what plain decoding gives; unconstrained requests only.
    #[serde(default)]
    pub prompt_lookup: usize,
    /// Speculative decoding with a draft model: the name of another model of this config,
    /// listed before this one, with the same vocabulary (the 0.5B for the 1.5B), that proposes
    /// up to `draft_tokens` tokens greedily after each token; this model verifies them in the
    /// same step. "" = off. With `prompt_lookup` too, lookup drafts first, as far as the draft
    /// model predicts the same tokens, and the draft model where the context has no match.
    #[serde(default)]
    pub draft: String,
    /// Drafts per step at most, with `draft` (1–32).
    #[serde(default = "default_draft_tokens")]
    pub draft_tokens: usize,
    /// With `draft`: the draft model proposes from the first this many token ids and the
    /// special tokens, its LM head computing only theirs (an int8 head's rows in int4), while
    /// the request's context keeps to them (`draft::draft_vocabulary`); 0 = every token.
    #[serde(default = "default_draft_vocab")]
    pub draft_vocab: usize,
}

fn default_draft_tokens() -> usize {
    crate::draft::DEFAULT_DRAFT_TOKENS
}

fn default_draft_vocab() -> usize {
    crate::draft::DEFAULT_DRAFT_VOCABULARY
}

impl ModelSection {
    /// The name requests use: `name`, else derived from the bundle path.
    pub fn name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        self.store_name()
            .or_else(|| Some(self.bundle.file_name()?.to_str()?.to_string()))
            .filter(|d| valid_model_name(d))
            .unwrap_or_else(|| "model".into())
    }

    /// The model's store name when its bundle is `<store>/<name>/current`.
    pub fn store_name(&self) -> Option<String> {
        let b = &self.bundle;
        (b.file_name()? == "current")
            .then(|| b.parent()?.file_name()?.to_str().map(str::to_string))
            .flatten()
    }

    pub fn backend(&self) -> Result<BackendKind, String> {
        self.backend.parse()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub request_timeout_s: u64,
    /// Largest request: one socket line or one MQTT message, in bytes.
    pub max_request_bytes: usize,
    /// Minimum time between two tokens of one request (0 = as fast as the model goes).
    pub min_token_interval_ms: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_concurrent: 1,
            max_queue: 16,
            max_prompt_tokens: 4096,
            max_new_tokens: 1024,
            request_timeout_s: 120,
            max_request_bytes: 1024 * 1024,
            min_token_interval_ms: 0,
        }
    }
}

/// `[cache]`: the prefix cache (native backend): keys and values of prompt prefixes kept for
/// the requests that start the same way, evicted least recently used first.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// Memory for it, in MiB (0: off). 64 MiB hold about 2,700 positions of the 0.5B model's
    /// f32 cache (5,400 with `kv_cache = "f16"`): several shared system prompts.
    pub size_mib: usize,
    /// Non-empty: each model's cache is saved here when the service stops (or the model is
    /// reloaded), as `<model name>.prefix-cache`, and loaded again when the same model version
    /// starts, so a restart does not prefill every system prompt again. Relative to the config
    /// file's directory.
    pub dir: PathBuf,
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            size_mib: 64,
            dir: PathBuf::new(),
        }
    }
}

impl CacheSection {
    /// The file model `name`'s cache is saved in, when saving is on.
    pub fn file_for(&self, name: &str) -> Option<PathBuf> {
        if self.dir.as_os_str().is_empty() || self.size_mib == 0 {
            return None;
        }
        // Names are checked to be `[A-Za-z0-9._-]` already; mapped again here so that no
        // name, however it got in, can lead outside the directory.
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Some(self.dir.join(format!("{safe}.prefix-cache")))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnixSocketSection {
    /// Empty: the socket front end is off.
    pub path: PathBuf,
    /// Octal permission bits of the socket file, as a string ("0660").
    pub mode: String,
    /// Group that owns the socket file (name or number); empty: the service's own group.
    pub group: String,
    /// Accept `{"op":"reload"}` from a peer that is root or the service's own user (checked
    /// with the socket's peer credentials); off: SIGHUP only.
    pub allow_reload: bool,
    /// A client whose answers could not be written for this long (it stopped reading) is
    /// dropped and its requests cancelled.
    pub write_timeout_s: u64,
    /// Connections served at once; one more gets a `busy` error line and is closed.
    pub max_connections: usize,
}

impl Default for UnixSocketSection {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/run/qwen2-edge/qwen2-edge.sock"),
            mode: "0660".into(),
            group: String::new(),
            allow_reload: false,
            write_timeout_s: 30,
            max_connections: 256,
        }
    }
}

impl UnixSocketSection {
    pub fn enabled(&self) -> bool {
        !self.path.as_os_str().is_empty()
    }

    /// The permission bits (validated by `ServiceConfig::validate`).
    pub fn mode_bits(&self) -> Result<u32, ConfigError> {
        parse_mode("unix_socket.mode", &self.mode)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleSection {
    /// After SIGTERM/SIGINT, accepted requests get this long to finish before they are
    /// cancelled (keep it below systemd's TimeoutStopSec).
    pub grace_period_s: u64,
}

impl Default for LifecycleSection {
    fn default() -> Self {
        Self { grace_period_s: 20 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One plain line per event, no colours or timestamps (journald adds its own).
    Plain,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub format: LogFormat,
    /// A tracing filter ("info", "qwen2_edge=debug,warn"); RUST_LOG wins when set.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: LogFormat::Plain,
            level: "info".into(),
        }
    }
}

fn default_backend() -> String {
    "native".into()
}

fn default_kernels() -> String {
    "auto".into()
}

fn default_variant() -> String {
    "fp32".into()
}

fn yes() -> bool {
    true
}

impl ServiceConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let mut config = Self::parse(&text)?;
        // A relative bundle path means relative to the config file, not to wherever the
        // service happens to be started from.
        if let Some(dir) = path.parent() {
            if config.cache.dir.is_relative() && !config.cache.dir.as_os_str().is_empty() {
                config.cache.dir = dir.join(&config.cache.dir);
            }
            for m in config.models.iter_mut() {
                if m.bundle.is_relative() {
                    m.bundle = dir.join(&m.bundle);
                }
                for spec in &mut m.trusted_keys {
                    if !spec.trim_start().starts_with("ed25519:")
                        && Path::new(spec.as_str()).is_relative()
                    {
                        *spec = dir.join(spec.as_str()).display().to_string();
                    }
                }
            }
        }
        config.apply_environment()?;
        Ok(config)
    }

    /// Settings the environment gives win over the file's (`environment::layered`).
    fn apply_environment(&mut self) -> Result<(), ConfigError> {
        use environment::{layered, layered_path, KERNELS, KV_CACHE, ORT_LIBRARY};
        for m in self.models.iter_mut() {
            m.kernels = layered(None, KERNELS, std::mem::take(&mut m.kernels))?;
            m.kv_cache = layered(None, KV_CACHE, m.kv_cache)?;
        }
        self.ort.library = layered_path(None, ORT_LIBRARY, self.ort.library.take());
        Ok(())
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError(one_line(&e)))?;
        let config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = one_line(e.inner());
            if path.is_empty() || path == "." {
                ConfigError(inner)
            } else {
                ConfigError(format!("{path}: {inner}"))
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The `[http]` section when HTTP is on.
    pub fn http_enabled(&self) -> Option<&HttpSection> {
        self.http.as_ref().filter(|h| h.enabled)
    }

    /// The `[mqtt]` section when MQTT is on.
    pub fn mqtt_enabled(&self) -> Option<&MqttSection> {
        self.mqtt.as_ref().filter(|m| m.enabled)
    }

    /// The default model: the first.
    pub fn model(&self) -> &ModelSection {
        &self.models[0]
    }

    /// How errors name model `i`'s keys: `model` with one model, `model[i]` with several.
    pub fn model_key(&self, i: usize) -> String {
        if self.models.len() == 1 {
            "model".into()
        } else {
            format!("model[{i}]")
        }
    }

    /// Model `i`'s backend; the error names the key.
    pub fn backend_of(&self, i: usize) -> Result<BackendKind, ConfigError> {
        self.models[i]
            .backend()
            .map_err(|e| ConfigError(format!("{}.backend: {e}", self.model_key(i))))
    }

    /// Model `i`'s trusted keys, parsed; the error names the key.
    pub fn trusted_keys_of(&self, i: usize) -> Result<Vec<TrustedKey>, ConfigError> {
        let key = self.model_key(i);
        self.models[i]
            .trusted_keys
            .iter()
            .map(|spec| {
                TrustedKey::parse(spec)
                    .map_err(|e| ConfigError(format!("{key}.trusted_keys: {e:#}")))
            })
            .collect()
    }

    /// The model called `name`, with its index.
    pub fn find_model(&self, name: &str) -> Option<(usize, &ModelSection)> {
        self.models
            .iter()
            .enumerate()
            .find(|(_, m)| m.name() == name)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.models.is_empty() {
            return err("model: at least one [[model]] is needed");
        }
        at_most("model", self.models.len() as u64, 16)?;
        for (i, m) in self.models.iter().enumerate() {
            self.validate_model(i, m)?;
        }
        self.ort
            .validate()
            .map_err(|e| ConfigError(format!("ort: {e}")))?;
        let l = &self.limits;
        positive("limits.max_concurrent", l.max_concurrent as u64)?;
        positive("limits.max_prompt_tokens", l.max_prompt_tokens as u64)?;
        positive("limits.max_new_tokens", l.max_new_tokens as u64)?;
        positive("limits.request_timeout_s", l.request_timeout_s)?;
        // Far beyond any sane setting, small enough that Duration and Instant arithmetic
        // cannot overflow.
        at_most(
            "limits.request_timeout_s",
            l.request_timeout_s,
            366 * 24 * 3600,
        )?;
        at_most(
            "limits.min_token_interval_ms",
            l.min_token_interval_ms,
            60_000,
        )?;
        if l.max_request_bytes < 1024 {
            return err(format!(
                "limits.max_request_bytes must be at least 1024, got {}",
                l.max_request_bytes
            ));
        }
        // MQTT packets carry at most 256 MiB; a single request line beyond that is abuse.
        at_most(
            "limits.max_request_bytes",
            l.max_request_bytes as u64,
            128 * 1024 * 1024,
        )?;
        at_most("limits.max_concurrent", l.max_concurrent as u64, 256)?;
        at_most("limits.max_queue", l.max_queue as u64, 1_000_000)?;
        at_most("cache.size_mib", self.cache.size_mib as u64, 1 << 20)?;
        let u = &self.unix_socket;
        positive("unix_socket.write_timeout_s", u.write_timeout_s)?;
        positive("unix_socket.max_connections", u.max_connections as u64)?;
        at_most(
            "unix_socket.max_connections",
            u.max_connections as u64,
            65_536,
        )?;
        at_most("unix_socket.write_timeout_s", u.write_timeout_s, 24 * 3600)?;
        if u.enabled() {
            parse_mode("unix_socket.mode", &u.mode)?;
            if u.path.file_name().is_none() {
                return err(format!(
                    "unix_socket.path must name a socket file, got {}",
                    u.path.display()
                ));
            }
            socket_path_fits("unix_socket.path", &u.path)?;
        }
        if let Some(m) = &self.mqtt {
            m.validate()?;
        }
        if let Some(h) = &self.http {
            h.validate()?;
        }
        if !u.enabled() && self.mqtt_enabled().is_none() && self.http_enabled().is_none() {
            return err("no front end: set unix_socket.path or add an [mqtt] or [http] section");
        }
        at_most(
            "lifecycle.grace_period_s",
            self.lifecycle.grace_period_s,
            24 * 3600,
        )?;
        if self.log.level.trim().is_empty() {
            return err("log.level must not be empty (e.g. \"info\")");
        }
        Ok(())
    }

    fn validate_model(&self, i: usize, m: &ModelSection) -> Result<(), ConfigError> {
        let key = self.model_key(i);
        if m.bundle.as_os_str().is_empty() {
            return err(format!("{key}.bundle must name the model bundle directory"));
        }
        if !m.name.is_empty() && !valid_model_name(&m.name) {
            return err(format!(
                "{key}.name must be 1-64 letters, digits, '.', '_' or '-', got {:?}",
                m.name
            ));
        }
        let name = m.name();
        if let Some(j) = self.models[..i].iter().position(|o| o.name() == name) {
            return err(format!(
                "{key}.name: {name:?} is already the name of {}; give each model its own name",
                self.model_key(j)
            ));
        }
        self.backend_of(i)?;
        if m.variant.is_empty() {
            return err(format!("{key}.variant must not be empty"));
        }
        at_most(
            &format!("{key}.prompt_lookup"),
            m.prompt_lookup as u64,
            crate::lookup::MAX_DRAFT as u64,
        )?;
        positive(&format!("{key}.draft_tokens"), m.draft_tokens as u64)?;
        at_most(
            &format!("{key}.draft_tokens"),
            m.draft_tokens as u64,
            crate::lookup::MAX_DRAFT as u64,
        )?;
        if !m.draft.is_empty() && !self.models[..i].iter().any(|o| o.name() == m.draft) {
            return err(format!(
                "{key}.draft: {:?} is not a model listed before this one (the draft model \
                 loads first)",
                m.draft
            ));
        }
        if !m.trusted_keys.is_empty() && !m.verify {
            return err(format!(
                "{key}.trusted_keys needs {key}.verify = true: a signature vouches for the \
                 files only through their hashes"
            ));
        }
        Ok(())
    }
}

/// A model name: 1–64 of `[A-Za-z0-9._-]` (it appears in requests, topics and metric labels).
pub fn valid_model_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A Unix socket path fits a `sockaddr_un` (108 bytes with the terminating NUL).
fn socket_path_fits(key: &str, path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().len() > 107 {
        return err(format!(
            "{key} is longer than the 107 bytes a Unix socket path may have: {}",
            path.display()
        ));
    }
    Ok(())
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return err(format!("{key} must be at least 1, got 0"));
    }
    Ok(())
}

fn at_most(key: &str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value > max {
        return err(format!("{key} must be at most {max}, got {value}"));
    }
    Ok(())
}

/// "0660" → 0o660; `key` names the setting in the error.
fn parse_mode(key: &str, mode: &str) -> Result<u32, ConfigError> {
    let valid = (3..=4).contains(&mode.len()) && mode.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(mode, 8) {
        Ok(bits) if valid && bits <= 0o777 => Ok(bits),
        _ => err(format!(
            "{key} must be octal permission bits such as \"0660\", got {mode:?}"
        )),
    }
}

/// toml's messages quote the offending line over several lines; config errors are one line.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<ServiceConfig, ConfigError> {
        ServiceConfig::parse(&format!("[model]\nbundle = \"/m\"\n{extra}"))
    }

    fn message(extra: &str) -> String {
        parse(extra).expect_err("should fail").0
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = parse("").expect("valid");
        assert_eq!(c.model().backend, "native");
        assert_eq!(c.limits, LimitsSection::default());
        assert!(c.unix_socket.enabled());
        assert_eq!(c.unix_socket.mode_bits(), Ok(0o660));
        assert!(c.mqtt.is_none());
        assert_eq!(c.log.format, LogFormat::Plain);
    }

    #[test]
    fn missing_bundle_is_named() {
        let m = ServiceConfig::parse("[limits]\nmax_queue = 1\n").expect_err("no bundle");
        assert!(m.0.contains("model"), "{m}");
        let m = ServiceConfig::parse("[model]\nbackend = \"native\"\n").expect_err("no bundle");
        assert!(m.0.contains("bundle"), "{m}");
    }

    #[test]
    fn unknown_keys_and_sections_are_errors_naming_them() {
        let m = message("[limits]\nmax_queu = 3\n");
        assert!(m.contains("limits") && m.contains("max_queu"), "{m}");
        let m = message("[limitz]\n");
        assert!(m.contains("limitz"), "{m}");
        let m = message("[mqtt]\nurll = \"mqtt://x\"\n");
        assert!(m.contains("mqtt") && m.contains("urll"), "{m}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let m = message("[limits]\nmax_queue = \"many\"\n");
        assert!(m.starts_with("limits.max_queue:"), "{m}");
        let m = message("[limits]\nmax_concurrent = -1\n");
        assert!(m.starts_with("limits.max_concurrent:"), "{m}");
        let m = message("[log]\nformat = \"xml\"\n");
        assert!(m.starts_with("log.format:"), "{m}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (extra, key) in [
            ("[limits]\nmax_concurrent = 0\n", "limits.max_concurrent"),
            ("[limits]\nmax_new_tokens = 0\n", "limits.max_new_tokens"),
            (
                "[limits]\nmax_request_bytes = 10\n",
                "limits.max_request_bytes",
            ),
            ("[unix_socket]\nmode = \"0999\"\n", "unix_socket.mode"),
            ("[unix_socket]\nmode = \"rw\"\n", "unix_socket.mode"),
            ("[model]\n", "model"),
            ("[mqtt]\nurl = \"http://x\"\n", "mqtt.url"),
            ("[mqtt]\nurl = \"mqtt://x:0\"\n", "mqtt.url"),
            ("[mqtt]\ntopic_prefix = \"a/#\"\n", "mqtt.topic_prefix"),
            ("[mqtt]\nshared_group = \"a/b\"\n", "mqtt.shared_group"),
            ("[mqtt]\nca_file = \"/ca.pem\"\n", "mqtt.ca_file"),
            ("[mqtt]\npassword = \"x\"\n", "mqtt.password"),
            (
                "[mqtt]\nreconnect_initial_ms = 10\nreconnect_max_ms = 5\n",
                "mqtt.reconnect_max_ms",
            ),
            ("[mqtt]\nclient_id = \"\"\n", "mqtt.client_id"),
            ("[log]\nlevel = \"\"\n", "log.level"),
        ] {
            let m = message(extra);
            assert!(m.contains(key), "{extra:?}: {m}");
        }
        let m = ServiceConfig::parse("[model]\nbundle = \"/m\"\nbackend = \"onnx\"\n")
            .expect_err("bad backend")
            .0;
        assert!(m.contains("model.backend"), "{m}");
        let m = ServiceConfig::parse("[model]\nbundle = \"/m\"\nprompt_lookup = 33\n")
            .expect_err("too many drafts")
            .0;
        assert_eq!(m, "model.prompt_lookup must be at most 32, got 33");
        let ok =
            ServiceConfig::parse("[model]\nbundle = \"/m\"\nprompt_lookup = 8\n").expect("valid");
        assert_eq!(ok.model().prompt_lookup, 8);
        let m = ServiceConfig::parse("[model]\nbundle = \"/m\"\nlm_head = \"int3\"\n")
            .expect_err("bad head")
            .0;
        assert!(m.starts_with("model.lm_head:") && m.contains("int4"), "{m}");
        let ok =
            ServiceConfig::parse("[model]\nbundle = \"/m\"\nlm_head = \"int4\"\n").expect("valid");
        assert_eq!(ok.model().lm_head, LmHead::Int4);
    }

    #[test]
    fn a_draft_model_is_one_listed_before() {
        let two = |second: &str| {
            ServiceConfig::parse(&format!(
                "[[model]]\nname = \"small\"\nbundle = \"/s\"\n\
                 [[model]]\nname = \"big\"\nbundle = \"/b\"\n{second}"
            ))
            .map_err(|e| e.0)
        };
        let ok = two("draft = \"small\"\ndraft_tokens = 6\ndraft_vocab = 0\n").expect("valid");
        assert_eq!(
            (
                ok.models[1].draft.as_str(),
                ok.models[1].draft_tokens,
                ok.models[1].draft_vocab
            ),
            ("small", 6, 0)
        );
        assert_eq!(ok.models[0].draft_tokens, 3, "the default");
        assert_eq!(ok.models[0].draft_vocab, 65536, "the default");
        // Both ways of drafting at once: lookup first, the model where it has nothing.
        let both = two("draft = \"small\"\nprompt_lookup = 8\n").expect("valid");
        assert_eq!(both.models[1].prompt_lookup, 8);
        for (second, want) in [
            (
                "draft = \"big\"\n",
                "model[1].draft: \"big\" is not a model listed before",
            ),
            (
                "draft = \"large\"\n",
                "model[1].draft: \"large\" is not a model listed",
            ),
            (
                "draft = \"small\"\ndraft_tokens = 0\n",
                "model[1].draft_tokens",
            ),
            (
                "draft = \"small\"\ndraft_tokens = 33\n",
                "model[1].draft_tokens",
            ),
        ] {
            let e = two(second).expect_err(second);
            assert!(e.starts_with(want), "{second:?}: {e}");
        }
    }

    #[test]
    fn a_front_end_is_required() {
        let m = message("[unix_socket]\npath = \"\"\n");
        assert!(m.contains("front end"), "{m}");
        let c = parse("[unix_socket]\npath = \"\"\n[mqtt]\n").expect("mqtt only");
        assert!(!c.unix_socket.enabled());
        let m = message("[unix_socket]\npath = \"\"\n[mqtt]\nenabled = false\n");
        assert!(m.contains("front end"), "{m}");
    }

    #[test]
    fn mqtt_urls() {
        let a = |u: &str| mqtt::parse_mqtt_url(u);
        assert_eq!(
            a("mqtt://127.0.0.1:1884"),
            Ok(BrokerAddress {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false
            })
        );
        assert_eq!(
            a("mqtts://broker.lan").map(|b| (b.port, b.tls)),
            Ok((8883, true))
        );
        assert_eq!(
            a("mqtt://[::1]:9000").map(|b| (b.host, b.port)),
            Ok(("::1".into(), 9000))
        );
        assert!(a("mqtt://user:pw@host").is_err());
        assert!(a("mqtt://host/path").is_err());
        assert!(a("mqtt://:1883").is_err());
        assert!(a("host:1883").is_err());
    }

    #[test]
    fn mqtt_topics() {
        let c = parse("[mqtt]\ntopic_prefix = \"edge/llm\"\nshared_group = \"boxes\"\n")
            .expect("valid");
        let m = c.mqtt.expect("mqtt");
        assert_eq!(m.subscription(), "$share/boxes/edge/llm/request");
        assert_eq!(m.status_topic(), "edge/llm/status");
        assert_eq!(m.cancel_topic(), "edge/llm/cancel");
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("m", "0600"), Ok(0o600));
        assert_eq!(parse_mode("m", "660"), Ok(0o660));
        assert!(parse_mode("m", "1777").is_err());
        assert!(parse_mode("m", "06600").is_err());
        assert!(parse_mode("m", "").is_err());
    }

    /// systemd/qwen2-edge.toml documents every key, each at its default (apart from the
    /// required bundle; MQTT and HTTP, which the example leaves off; and the MQTT journal and
    /// the saved prefix cache, off by default but on in the package, in its state directory).
    #[test]
    fn example_config_lists_every_key_with_its_default() {
        let text = include_str!("../../systemd/qwen2-edge.toml");
        let example: toml::Table = text.parse().expect("example parses as TOML");
        let bundle = example["model"]["bundle"]
            .as_str()
            .expect("bundle")
            .to_string();
        let defaults = ServiceConfig::parse(&format!(
            "[model]\nbundle = {bundle:?}\n[mqtt]\nenabled = false\n\
             journal_dir = \"/var/lib/qwen2-edge/mqtt-journal\"\n[http]\nenabled = false\n\
             [cache]\ndir = \"/var/lib/qwen2-edge/prefix-cache\"\n"
        ))
        .expect("defaults");
        let want = toml::Table::try_from(&defaults).expect("serialize");
        assert_eq!(example, want);
        assert_eq!(
            ServiceConfig::parse(text).expect("example is valid"),
            defaults
        );
    }

    #[test]
    fn several_models_each_with_a_name() {
        let two = "[[model]]\nname = \"small\"\nbundle = \"/m/a\"\n\
                   [[model]]\nbundle = \"/store/assistant/current\"\nvariant = \"int4\"\n\
                   reload_strategy = \"swap\"\n";
        let c = ServiceConfig::parse(two).expect("two models");
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.model().name(), "small");
        assert_eq!(c.models[1].name(), "assistant");
        assert_eq!(c.models[1].store_name().as_deref(), Some("assistant"));
        assert_eq!(c.models[1].reload_strategy, ReloadStrategy::Swap);
        assert_eq!(c.find_model("assistant").map(|(i, _)| i), Some(1));
        // One [model] table: named from its path.
        let c = parse("").expect("one model");
        assert_eq!(c.model().name(), "m");
        assert_eq!(c.model().reload_strategy, ReloadStrategy::Overlap);
        // Errors name the model by its index.
        let m = ServiceConfig::parse(&format!("{two}[[model]]\nbundle = \"/x/small\"\n"))
            .expect_err("duplicate name")
            .0;
        assert!(
            m.starts_with("model[2].name") && m.contains("model[0]"),
            "{m}"
        );
        let m = ServiceConfig::parse(&two.replace("\"int4\"", "\"\""))
            .expect_err("no variant")
            .0;
        assert!(m.starts_with("model[1].variant"), "{m}");
        let m = message("name = \"a b\"\n");
        assert!(m.starts_with("model.name"), "{m}");
        let m = ServiceConfig::parse("[[model]]\nbundle = \"/a\"\nbogus = 1\n")
            .expect_err("unknown key")
            .0;
        assert!(m.contains("bogus"), "{m}");
        let m = message("reload_strategy = \"later\"\n");
        assert!(m.contains("reload_strategy"), "{m}");
    }

    #[test]
    fn relative_bundle_is_relative_to_the_config_file() {
        let dir = std::env::temp_dir().join(format!("qwen2-edge-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[model]\nbundle = \"models/m\"\n[cache]\ndir = \"state\"\n",
        )
        .expect("write");
        let c = ServiceConfig::load(&file).expect("load");
        assert_eq!(c.model().bundle, dir.join("models/m"));
        assert_eq!(c.cache.dir, dir.join("state"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_prefix_cache_file_is_named_after_the_model_when_saving_is_on() {
        let mut cache = CacheSection::default();
        assert_eq!(cache.file_for("assistant"), None, "memory only by default");
        cache.dir = PathBuf::from("/var/lib/q");
        assert_eq!(
            cache.file_for("assistant"),
            Some(PathBuf::from("/var/lib/q/assistant.prefix-cache"))
        );
        assert_eq!(
            cache.file_for("a/../b"),
            Some(PathBuf::from("/var/lib/q/a_.._b.prefix-cache")),
            "never outside the directory"
        );
        cache.size_mib = 0;
        assert_eq!(cache.file_for("assistant"), None, "no cache, no file");
    }
}
