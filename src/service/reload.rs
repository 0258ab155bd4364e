//! Loading models, at start-up and on a reload (SIGHUP, `systemctl reload`, a reload request).
//!
//! A reload reads the config file again and replaces each model whose `[[model]]` section (or
//! `[cache]`, `[ort]`) changed or whose bundle path now leads to another directory (a store's
//! `current` moved by `bundle install`); the others keep serving untouched. Models are
//! replaced one at a time, each by its `reload_strategy`:
//! - `overlap`: the new version is loaded (hashes, signature, a 4-token smoke test) next to the
//!   old one, takes the new requests, and the old one finishes what it accepted in the
//!   background, then is freed. Nobody waits; both are in memory for a while.
//! - `swap`: the old version stops taking requests (`busy`), finishes what it accepted, is
//!   freed, and only then is the new one loaded. One model's memory; a pause. If the new one
//!   fails, the old version is loaded again from its directory.
//!
//! A failure leaves the model's old version serving and is reported per model in `health`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::backend::options::OrtOptions;
use crate::bundle::Verify;
use crate::config::{LimitsSection, ModelSection, ReloadStrategy, ServiceConfig};
use crate::engine::{Engine, EngineOptions};

use super::protocol::ReloadStatus;
use super::scheduler::{DraftEngine, Scheduler, SchedulerConfig};
use super::serving::{finished, ModelServing, Serving};
use super::Context;

/// What one model is loaded from: its section and the service-wide settings it uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub model: ModelSection,
    pub trusted_keys: Vec<crate::signature::TrustedKey>,
    pub prefix_cache_mib: usize,
    /// Where the model's prefix cache is saved across restarts (`[cache] dir`).
    pub prefix_cache_file: Option<PathBuf>,
    pub ort: OrtOptions,
}

impl ModelSpec {
    /// Model `i` of `config` (validated: its keys parse).
    pub fn of(config: &ServiceConfig, i: usize) -> Result<Self> {
        Ok(Self {
            model: config.models[i].clone(),
            trusted_keys: config.trusted_keys_of(i)?,
            prefix_cache_mib: config.cache.size_mib,
            prefix_cache_file: config.cache.file_for(&config.models[i].name()),
            ort: config.ort.clone(),
        })
    }

    pub fn name(&self) -> String {
        self.model.name()
    }

    /// The model loaded and its scheduler started (blocking: seconds). `smoke`: generate 4
    /// tokens first (a reload's check that the new version works). `loaded`: the models
    /// serving already, among which its draft model (`[[model]] draft`) is.
    pub fn load(
        &self,
        limits: &LimitsSection,
        smoke: bool,
        loaded: &[ModelServing],
    ) -> Result<Scheduler> {
        let draft = self.draft_engine(loaded)?;
        let engine = self.load_engine()?;
        if smoke {
            let out = engine
                .smoke_test()
                .with_context(|| format!("smoke test of model {:?}", self.name()))?;
            tracing::info!(model = self.name(), text = %out.text, "smoke test passed");
        }
        let config = SchedulerConfig {
            prompt_lookup: self.model.prompt_lookup,
            draft,
            ..SchedulerConfig::new(&self.name(), limits)
        };
        Scheduler::start(Arc::new(engine), config)
    }

    /// The engine of the model this one drafts with, as it serves now. A model keeps the
    /// draft version it was loaded with until it is loaded again itself.
    fn draft_engine(&self, loaded: &[ModelServing]) -> Result<Option<DraftEngine>> {
        let name = &self.model.draft;
        if name.is_empty() {
            return Ok(None);
        }
        let engine = loaded
            .iter()
            .find(|m| &m.name == name)
            .and_then(|m| m.current())
            .map(|s| s.engine())
            .with_context(|| format!("the draft model {name:?} is not loaded"))?;
        Ok(Some(DraftEngine {
            engine,
            max_tokens: self.model.draft_tokens,
            vocabulary: self.model.draft_vocab,
        }))
    }

    fn load_engine(&self) -> Result<Engine> {
        let m = &self.model;
        let started = Instant::now();
        let engine = Engine::load(&EngineOptions {
            bundle: m.bundle.clone(),
            verify: if m.verify {
                Verify::Full
            } else {
                Verify::SizesOnly
            },
            backend: m.backend().map_err(|e| anyhow::anyhow!("{e}"))?,
            variant: m.variant.clone(),
            threads: m.threads,
            kernels: m.kernels.clone(),
            kv_cache: m.kv_cache,
            lm_head: m.lm_head,
            no_mmap: !m.mmap,
            prefix_cache_mib: self.prefix_cache_mib,
            prefix_cache_file: self.prefix_cache_file.clone(),
            ort: self.ort.clone(),
            trusted_keys: self.trusted_keys.clone(),
        })?;
        tracing::info!(
            "model {:?}: loaded {} ({} backend, variant {}) in {:.1} s; bundle {}",
            self.name(),
            engine.bundle.dir.display(),
            engine.backend.name(),
            m.variant,
            started.elapsed().as_secs_f64(),
            engine.bundle.signature
        );
        Ok(engine)
    }
}

/// What a reload needs: the config file to read again and the config the service started with.
pub struct Reloader {
    pub path: PathBuf,
    pub running: ServiceConfig,
}

impl Reloader {
    /// The config file as it is now; the models' names must be those the service started with
    /// (adding or removing a model needs a restart).
    fn read(&self) -> Result<ServiceConfig> {
        let config = ServiceConfig::load(&self.path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
        let r = &self.running;
        if (
            &config.limits,
            &config.unix_socket,
            &config.mqtt,
            &config.http,
            &config.lifecycle,
        ) != (&r.limits, &r.unix_socket, &r.mqtt, &r.http, &r.lifecycle)
        {
            tracing::warn!(
                "reload: only [model] sections, [cache] and [ort] are reloaded; other changes need a restart"
            );
        }
        let names = |c: &ServiceConfig| c.models.iter().map(ModelSection::name).collect::<Vec<_>>();
        if names(&config) != names(r) {
            anyhow::bail!(
                "the config now names the models {:?}, the service runs {:?}: adding, removing or reordering models needs a restart",
                names(&config),
                names(r)
            );
        }
        Ok(config)
    }
}

/// Starts a reload in the background; `serving.begin_reload()` has succeeded (SIGHUP here, a
/// reload request in a front end).
pub fn start(ctx: &Context, reloader: &Arc<Reloader>) {
    let serving = Arc::clone(&ctx.serving);
    tracing::info!("reload: reading {}", reloader.path.display());
    let reloader = Arc::clone(reloader);
    let drain = ctx.limits.max_timeout + Duration::from_secs(5);
    tokio::spawn(async move {
        let work = Arc::clone(&serving);
        let result = tokio::task::spawn_blocking(move || run(&work, &reloader, drain))
            .await
            .map_err(|e| anyhow::anyhow!("the reload panicked: {e}"))
            .and_then(|r| r);
        match &result {
            Ok(()) => tracing::info!("reload: done"),
            Err(e) => tracing::error!("reload failed, the running models keep serving: {e:#}"),
        }
        serving.end_reload(result.map_err(|e| format!("{e:#}")));
    });
}

/// The reload itself (blocking): every changed model in turn; the errors of all of them.
fn run(serving: &Arc<Serving>, reloader: &Reloader, drain: Duration) -> Result<()> {
    let config = reloader.read()?;
    let mut errors = Vec::new();
    let mut changed = 0;
    for (i, slot) in serving.models().iter().enumerate() {
        let spec = ModelSpec::of(&config, i)?;
        if !needs_reload(slot, &spec) {
            continue;
        }
        changed += 1;
        if !serving.is_accepting() {
            anyhow::bail!("the service stopped during the reload");
        }
        slot.set_reload(ReloadStatus::InProgress);
        let result = match spec.model.reload_strategy {
            ReloadStrategy::Overlap => overlap(serving, i, spec, &reloader.running.limits, drain),
            ReloadStrategy::Swap => swap(serving, slot, spec, &reloader.running.limits, drain),
        };
        let result = result.map_err(|e| format!("{e:#}"));
        if let Err(e) = &result {
            tracing::error!("reload of model {:?} failed: {e}", slot.name);
            errors.push(format!("model {:?}: {e}", slot.name));
        }
        slot.set_reload(finished(result));
    }
    if changed == 0 {
        tracing::info!("reload: no model's config or bundle changed");
    }
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", errors.join("; "))
    }
}

/// Whether the config's section (or its bundle's directory) differs from what serves.
fn needs_reload(slot: &ModelServing, spec: &ModelSpec) -> bool {
    let Some(current) = slot.current() else {
        return true; // unloaded by a swap whose reload failed
    };
    slot.spec() != *spec
        || std::fs::canonicalize(&spec.model.bundle).map_or(true, |dir| dir != current.bundle_dir())
}

/// Loads the new version next to the old one, switches, lets the old one finish.
fn overlap(
    serving: &Arc<Serving>,
    i: usize,
    spec: ModelSpec,
    limits: &LimitsSection,
    drain: Duration,
) -> Result<()> {
    let slot = &serving.models()[i];
    tracing::info!(
        "reload: loading model {:?} next to the running one",
        slot.name
    );
    let next = spec.load(limits, true, serving.models())?;
    if !serving.is_accepting() {
        next.shutdown(Duration::ZERO);
        anyhow::bail!("the service stopped during the reload");
    }
    if let Some(old) = slot.replace(spec, next) {
        tracing::info!(
            "reload: model {:?}: the new version serves new requests; the old one finishes its own",
            slot.name
        );
        let serving = Arc::clone(serving);
        // The old version drains in the background: the next model's reload need not wait.
        std::thread::Builder::new()
            .name("retire".into())
            .spawn(move || {
                old.shutdown(drain);
                let slot = &serving.models()[i];
                slot.retired(&old);
                tracing::info!(
                    "reload: model {:?}: the old version finished and was unloaded",
                    slot.name
                );
            })
            .context("cannot start a thread")?;
    }
    Ok(())
}

/// Lets the old version finish and frees it, then loads the new one; if that fails, loads
/// the old version again from its directory.
fn swap(
    serving: &Serving,
    slot: &ModelServing,
    spec: ModelSpec,
    limits: &LimitsSection,
    drain: Duration,
) -> Result<()> {
    let previous = slot.spec();
    let mut previous_dir = None;
    if let Some(old) = slot.take() {
        tracing::info!(
            "reload (swap): model {:?} finishes its requests, then is unloaded",
            slot.name
        );
        old.shutdown(drain);
        slot.retired(&old);
        previous_dir = Some(old.bundle_dir().to_path_buf());
        release(old);
        tracing::info!("reload (swap): model {:?} unloaded", slot.name);
    }
    if !serving.is_accepting() {
        anyhow::bail!("the service stopped during the reload");
    }
    let error = match spec.load(limits, true, serving.models()) {
        Ok(next) => {
            slot.replace(spec, next);
            return Ok(());
        }
        Err(e) => e,
    };
    // The version that served before, from the directory it was loaded from (a store's
    // `current` may now lead to the broken one).
    let mut back = previous.clone();
    if let Some(dir) = previous_dir {
        back.model.bundle = dir;
    }
    match back.load(limits, false, serving.models()) {
        Ok(s) => {
            slot.replace(previous, s);
            Err(error.context("the previous version serves again"))
        }
        Err(again) => Err(error.context(format!(
            "the previous version could not be loaded again ({again:#}): the model is unloaded until a reload succeeds"
        ))),
    }
}

/// Drops the last handle on a finished scheduler, which frees its model. Front ends hold a
/// scheduler only while they hand it a request: wait (briefly) until they have let go.
fn release(old: Scheduler) {
    let until = Instant::now() + Duration::from_secs(5);
    while old.handles() > 1 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    if old.handles() > 1 {
        tracing::warn!("reload (swap): the old model is still referenced; it is freed when its last user lets go");
    }
}
