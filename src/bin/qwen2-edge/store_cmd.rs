//! `qwen2-edge bundle install | rollback | status`: the model store (`qwen2_edge::store`).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};

use qwen2_edge::backend::{BackendKind, KvCacheType, LmHead};
use qwen2_edge::bundle::Verify;
use qwen2_edge::config::{ModelSection, ServiceConfig};
use qwen2_edge::engine::EngineOptions;
use qwen2_edge::signature::TrustedKey;
use qwen2_edge::store::{self, InstallOptions, DEFAULT_STORE};

#[derive(Args)]
pub(crate) struct BundleArgs {
    #[command(subcommand)]
    command: BundleCommand,
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Verify a bundle (sizes, hashes, signature, a short generation), copy it into the model
    /// store and make it the current version; the one it replaces is kept for `rollback`.
    Install(InstallArgs),
    /// Make the previous version current again.
    Rollback(NamedArgs),
    /// The versions of a model in the store, and which is current and previous.
    Status(NamedArgs),
}

#[derive(Args)]
struct StoreArgs {
    /// The model store.
    #[arg(long, default_value = DEFAULT_STORE)]
    store: PathBuf,
    /// The service config: its `[model] trusted_keys` apply, its backend and variant run the
    /// smoke test, and a `model.bundle` of `<store>/<name>/current` names the model.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Require a signature by this Ed25519 public key (`ed25519:…` or a .pub file); repeat
    /// for several; added to the config's.
    #[arg(long = "trusted-key", value_name = "KEY")]
    trusted_keys: Vec<String>,
}

#[derive(Args)]
struct InstallArgs {
    /// The bundle directory to install.
    source: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// The model's name in the store, or the name of one of the config's models (whose
    /// `bundle = <store>/<name>/current` then names it) [default: from the config's model.bundle,
    /// else the bundle's source name].
    #[arg(long)]
    name: Option<String>,
    /// The version's name [default: the first 12 hex digits of bundle.json's sha256].
    #[arg(long)]
    version: Option<String>,
    /// Move the bundle into the store instead of copying it (same file system; else copied).
    #[arg(long = "move")]
    move_source: bool,
    /// Variant for the smoke test [default: the config's, else the bundle's first portable one].
    #[arg(long)]
    variant: Option<String>,
    /// Backend for the smoke test [default: the config's, else native].
    #[arg(long)]
    backend: Option<BackendKind>,
}

#[derive(Args)]
struct NamedArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The model's name in the store, or of one of the config's models [default: from the
    /// config's model.bundle].
    #[arg(long)]
    name: Option<String>,
}

pub(crate) fn run(args: BundleArgs) -> Result<()> {
    match args.command {
        BundleCommand::Install(a) => install(a),
        BundleCommand::Rollback(a) => {
            let (name, keys) = a.resolve()?;
            let done = store::rollback(&a.store.store, &name, &keys)?;
            out!(
                "{}: rolled back to {} ({} is previous now); `systemctl reload qwen2-edge` serves it",
                done.name,
                done.version,
                done.previous.as_deref().unwrap_or("-")
            );
            Ok(())
        }
        BundleCommand::Status(a) => {
            let (name, _) = a.resolve()?;
            let (versions, current, previous) = store::status(&a.store.store, &name)?;
            for v in versions {
                let mark = if current.as_deref() == Some(&v) {
                    "current"
                } else if previous.as_deref() == Some(&v) {
                    "previous"
                } else {
                    ""
                };
                out!("{v}\t{mark}");
            }
            Ok(())
        }
    }
}

impl NamedArgs {
    /// The model's name (the flag, else the config's `<store>/<name>/current`) and the keys.
    fn resolve(&self) -> Result<(String, Vec<TrustedKey>)> {
        let found = self.store.load(self.name.as_deref())?;
        let name = found.store_name().or_else(|| self.name.clone()).context(
            "--name is required (or a --config whose model.bundle is <store>/<name>/current)",
        )?;
        Ok((name, found.keys))
    }
}

/// What `--config` says about the model a command is about.
struct Found {
    config: Option<ServiceConfig>,
    /// Which of the config's models.
    index: Option<usize>,
    /// Its trusted keys (every model's when none matched), then the flags'.
    keys: Vec<TrustedKey>,
}

impl Found {
    fn model(&self) -> Option<&ModelSection> {
        Some(&self.config.as_ref()?.models[self.index?])
    }

    fn store_name(&self) -> Option<String> {
        self.model()?.store_name()
    }
}

impl StoreArgs {
    /// The config (if any), the model of it called `name` (by its store name or its name;
    /// without a name, the only one), and the trusted keys.
    fn load(&self, name: Option<&str>) -> Result<Found> {
        let config = self
            .config
            .as_deref()
            .map(|p| ServiceConfig::load(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
            .transpose()?;
        let mut found = Found {
            index: None,
            keys: Vec::new(),
            config: None,
        };
        if let Some(c) = &config {
            found.index = match name {
                Some(n) => c
                    .models
                    .iter()
                    .position(|m| m.store_name().as_deref() == Some(n) || m.name() == n),
                None if c.models.len() == 1 => Some(0),
                None => anyhow::bail!("the config serves several models: say which with --name"),
            };
            let models: Vec<usize> = match found.index {
                Some(i) => vec![i],
                None => (0..c.models.len()).collect(),
            };
            for i in models {
                for key in c.trusted_keys_of(i)? {
                    if !found.keys.contains(&key) {
                        found.keys.push(key);
                    }
                }
            }
        }
        found.config = config;
        for spec in &self.trusted_keys {
            found.keys.push(TrustedKey::parse(spec)?);
        }
        Ok(found)
    }
}

fn install(a: InstallArgs) -> Result<()> {
    let found = a.store.load(a.name.as_deref())?;
    let model = found.model();
    let smoke = EngineOptions {
        bundle: a.source.clone(),
        verify: Verify::SizesOnly,
        backend: match (a.backend, model) {
            (Some(b), _) => b,
            (None, Some(m)) => m
                .backend()
                .map_err(|e| anyhow::anyhow!("model.backend: {e}"))?,
            (None, None) => BackendKind::Native,
        },
        variant: a
            .variant
            .or_else(|| model.map(|m| m.variant.clone()))
            .unwrap_or_default(),
        threads: model.map_or(0, |m| m.threads),
        kernels: model.map_or_else(|| "auto".into(), |m| m.kernels.clone()),
        kv_cache: model.map_or(KvCacheType::F32, |m| m.kv_cache),
        lm_head: model.map_or(LmHead::Bundle, |m| m.lm_head),
        prefix_cache_mib: 0,
        prefix_cache_file: None,
        no_mmap: model.is_some_and(|m| !m.mmap),
        ort: found
            .config
            .as_ref()
            .map(|c| c.ort.clone())
            .unwrap_or_default(),
        trusted_keys: Vec::new(),
    };
    let done = store::install(
        &a.source,
        &InstallOptions {
            store: a.store.store.clone(),
            name: found.store_name().or_else(|| a.name.clone()),
            version: a.version,
            move_source: a.move_source,
            trusted_keys: found.keys.clone(),
            smoke,
        },
    )?;
    out!(
        "{}: {} installed and current ({}); previous: {}; `systemctl reload qwen2-edge` serves it",
        done.name,
        done.version,
        done.path.display(),
        done.previous.as_deref().unwrap_or("-")
    );
    Ok(())
}
