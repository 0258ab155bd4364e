//! The model store: verified bundle versions under `<store>/<name>/<version>`, a `current`
//! link the daemon's `model.bundle` names, and a `previous` link for `rollback`.
//!
//! `install` copies (or moves) a bundle into a hidden staging directory, verifies the copy
//! (sizes, hashes, signature) and generates a few tokens with it, renames it to its version,
//! and only then flips `current` (a new link renamed over the old: atomic). Killed at any point,
//! the store has the old or the new version current, never a partial one; the copy an
//! interrupted install left is removed by the next (a moved source is kept and reported).
//! Data is fsynced before each rename so a power loss cannot reorder them. One install or
//! rollback of a model at a time: nothing locks the store against two.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use sha2::{Digest, Sha256};

use crate::bundle::{Bundle, Verify};
use crate::engine::{Engine, EngineOptions};
use crate::signature::{TrustedKey, SIGNATURE_FILE};

/// Where the Debian package keeps models.
pub const DEFAULT_STORE: &str = "/var/lib/qwen2-edge/models";
const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
/// Staged copies: removed when an interrupted install left one.
const STAGING_PREFIX: &str = ".incoming-";
/// A staged source that was moved (`--move`): the only copy, never removed, only reported.
const MOVED_PREFIX: &str = ".moved-";
/// Names a step after which `install` stops dead (`install:<step>`): the crash-safety tests
/// interrupt it at every step this way.
pub const FAILPOINT_ENV: &str = "QWEN2_EDGE_FAILPOINT";

/// How to install.
pub struct InstallOptions {
    pub store: PathBuf,
    /// Default: the bundle's source name, made file-name safe.
    pub name: Option<String>,
    /// Default: the first 12 hex digits of bundle.json's sha256 (the same bundle installs as
    /// the same version).
    pub version: Option<String>,
    /// Rename the source into the store instead of copying it (same file system only).
    pub move_source: bool,
    /// Keys one of which must have signed the bundle (empty: not required).
    pub trusted_keys: Vec<TrustedKey>,
    /// The smoke test's engine: backend, variant (empty: the first portable one), threads,
    /// kernels (its bundle path is replaced by the staged copy).
    pub smoke: EngineOptions,
}

/// What an install or rollback did.
#[derive(Debug)]
pub struct Installed {
    pub name: String,
    pub version: String,
    pub path: PathBuf,
    pub previous: Option<String>,
}

/// Installs `source` into the store and makes it current.
pub fn install(source: &Path, options: &InstallOptions) -> Result<Installed> {
    // Sizes and signature now; the hashes once, of the copy (a source that does not match its
    // bundle.json fails there, before anything is switched).
    let bundle = Bundle::open_trusted(source, Verify::SizesOnly, &options.trusted_keys)
        .with_context(|| format!("source bundle {}", source.display()))?;
    let name = match &options.name {
        Some(n) => checked_component("name", n)?,
        None => default_name(&bundle),
    };
    let version = match &options.version {
        Some(v) => checked_component("version", v)?,
        None => default_version(source)?,
    };
    let model_dir = options.store.join(&name);
    fs::create_dir_all(&model_dir)
        .with_context(|| format!("cannot create {}", model_dir.display()))?;
    remove_staging_leftovers(&model_dir);
    let target = model_dir.join(&version);
    if target.exists() {
        // Installed before (a re-install, or a rollback's way forward): verify it again.
        open_verified(&target, &options.trusted_keys)
            .with_context(|| format!("installed version {}", target.display()))?;
    } else {
        let prefix = if options.move_source {
            MOVED_PREFIX
        } else {
            STAGING_PREFIX
        };
        let staging = model_dir.join(format!("{prefix}{version}-{}", std::process::id()));
        let staged = stage(source, &bundle, &staging, options.move_source).and_then(|()| {
            failpoint("staged");
            open_verified(&staging, &options.trusted_keys)
                .with_context(|| format!("the copy in {}", staging.display()))?;
            failpoint("verified");
            smoke_test(&staging, &options.smoke, &bundle)?;
            failpoint("smoke-tested");
            make_read_only(&staging, &bundle_files(&bundle))?;
            fs::rename(&staging, &target).with_context(|| {
                format!(
                    "cannot rename {} to {}",
                    staging.display(),
                    target.display()
                )
            })
        });
        if let Err(e) = staged {
            if options.move_source && !source.exists() {
                // A moved source goes back where it was, not into the bin.
                let _ = fs::rename(&staging, source);
            } else {
                let _ = fs::remove_dir_all(&staging);
            }
            return Err(e);
        }
        sync_dir(&model_dir)?;
        failpoint("renamed");
    }
    let old = link_target(&model_dir, CURRENT);
    if let Some(old) = old.as_deref().filter(|old| *old != version) {
        set_link(&model_dir, PREVIOUS, old)?;
        failpoint("previous-set");
    }
    set_link(&model_dir, CURRENT, &version)?;
    failpoint("current-set");
    prune(&model_dir);
    Ok(Installed {
        path: target,
        previous: old.filter(|old| *old != version),
        name,
        version,
    })
}

/// Makes `previous` current again (and the current one previous).
pub fn rollback(store: &Path, name: &str, trusted_keys: &[TrustedKey]) -> Result<Installed> {
    let model_dir = store.join(checked_component("name", name)?);
    let current = link_target(&model_dir, CURRENT).ok_or_else(|| {
        anyhow!(
            "{}: nothing installed (no current link)",
            model_dir.display()
        )
    })?;
    let previous = link_target(&model_dir, PREVIOUS)
        .filter(|p| *p != current)
        .ok_or_else(|| {
            anyhow!(
                "{}: no previous version to roll back to",
                model_dir.display()
            )
        })?;
    let path = model_dir.join(&previous);
    open_verified(&path, trusted_keys)
        .with_context(|| format!("previous version {}", path.display()))?;
    set_link(&model_dir, CURRENT, &previous)?;
    set_link(&model_dir, PREVIOUS, &current)?;
    Ok(Installed {
        name: name.to_string(),
        version: previous,
        path,
        previous: Some(current),
    })
}

/// The versions of `name` in the store, with which is current and previous.
pub fn status(store: &Path, name: &str) -> Result<(Vec<String>, Option<String>, Option<String>)> {
    let model_dir = store.join(checked_component("name", name)?);
    let mut versions: Vec<String> = fs::read_dir(&model_dir)
        .with_context(|| format!("cannot read {}", model_dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    versions.sort();
    Ok((
        versions,
        link_target(&model_dir, CURRENT),
        link_target(&model_dir, PREVIOUS),
    ))
}

/// Opens `dir` with every file hashed (every variant's too) and its signature checked.
fn open_verified(dir: &Path, trusted_keys: &[TrustedKey]) -> Result<Bundle> {
    let bundle = Bundle::open_trusted(dir, Verify::Full, trusted_keys)?;
    for variant in bundle.variant_names() {
        bundle.verify_variant(variant)?;
    }
    Ok(bundle)
}

fn default_name(bundle: &Bundle) -> String {
    let raw = bundle
        .manifest
        .source
        .as_ref()
        .and_then(|s| s.name.clone())
        .unwrap_or_else(|| "model".into());
    let safe: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let safe = safe.trim_matches(['-', '.']).to_string();
    if safe.is_empty() {
        "model".into()
    } else {
        safe
    }
}

fn default_version(source: &Path) -> Result<String> {
    let bytes = fs::read(source.join("bundle.json"))
        .with_context(|| format!("cannot read {}", source.join("bundle.json").display()))?;
    let digest = Sha256::digest(&bytes);
    Ok(digest[..6].iter().map(|b| format!("{b:02x}")).collect())
}

/// A name or version: one plain path component.
fn checked_component(what: &str, value: &str) -> Result<String> {
    let ok = !value.is_empty()
        && value.len() <= 100
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
        && value != CURRENT
        && value != PREVIOUS;
    if !ok {
        bail!("{what} {value:?}: use letters, digits and . _ - + (not starting with a dot, not {CURRENT:?} or {PREVIOUS:?})");
    }
    Ok(value.to_string())
}

/// The files a bundle consists of: bundle.json, its signature, and what bundle.json lists.
fn bundle_files(bundle: &Bundle) -> Vec<String> {
    let mut files = vec!["bundle.json".to_string()];
    if bundle.dir.join(SIGNATURE_FILE).exists() {
        files.push(SIGNATURE_FILE.to_string());
    }
    files.extend(bundle.manifest.files.keys().cloned());
    files
}

/// Puts the bundle's files into `staging`, durably.
fn stage(source: &Path, bundle: &Bundle, staging: &Path, move_source: bool) -> Result<()> {
    if move_source {
        match fs::rename(source, staging) {
            Ok(()) => return sync_tree(staging, &bundle_files(bundle)),
            // Another file system: copy instead (the source stays).
            Err(e) if e.raw_os_error() == Some(18) => {} // EXDEV
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot move {} into the store", source.display()))
            }
        }
    }
    fs::create_dir(staging).with_context(|| format!("cannot create {}", staging.display()))?;
    for rel in bundle_files(bundle) {
        let to = staging.join(&rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(source.join(&rel), &to).with_context(|| {
            format!("cannot copy {} into the store", source.join(&rel).display())
        })?;
    }
    sync_tree(staging, &bundle_files(bundle))
}

/// Makes a verified version's files read-only: the daemon maps them, and a file rewritten in
/// place under a running model would fault it (only root can still write them).
fn make_read_only(root: &Path, files: &[String]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for rel in files {
        let path = root.join(rel);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o444))
            .with_context(|| format!("cannot make {} read-only", path.display()))?;
    }
    Ok(())
}

/// fsyncs the files, then their directories (deepest first), so a rename after this cannot be
/// on disk before the data it names.
fn sync_tree(root: &Path, files: &[String]) -> Result<()> {
    let mut dirs = std::collections::BTreeSet::new();
    for rel in files {
        let path = root.join(rel);
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync {}", path.display()))?;
        let mut dir = path.parent();
        while let Some(d) = dir.filter(|d| d.starts_with(root)) {
            dirs.insert(d.to_path_buf());
            dir = d.parent();
        }
    }
    for dir in dirs.iter().rev() {
        sync_dir(dir)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// Loads the staged copy and generates a few greedy tokens from a short prompt.
/// Without a variant named: the bundle's first portable one (every backend runs those).
fn smoke_test(dir: &Path, smoke: &EngineOptions, bundle: &Bundle) -> Result<()> {
    let variant = if smoke.variant.is_empty() {
        let names = bundle.variant_names();
        let portable = names.iter().find(|n| !n.contains('-')).or(names.first());
        portable
            .ok_or_else(|| anyhow!("the bundle has no variant"))?
            .to_string()
    } else {
        smoke.variant.clone()
    };
    let options = EngineOptions {
        bundle: dir.to_path_buf(),
        verify: Verify::SizesOnly, // hashed and its signature checked just before
        variant,
        trusted_keys: Vec::new(),
        ..smoke.clone()
    };
    let engine = Engine::load(&options).context("smoke test: the new bundle does not load")?;
    let out = engine
        .smoke_test()
        .context("smoke test: generating with the new bundle failed")?;
    tracing::info!(tokens = out.tokens.len(), text = %out.text, "smoke test passed");
    Ok(())
}

/// The version a link in `model_dir` points to (None: no such link).
fn link_target(model_dir: &Path, link: &str) -> Option<String> {
    fs::read_link(model_dir.join(link))
        .ok()
        .map(|t| t.to_string_lossy().into_owned())
}

/// Points `link` at `version` atomically: a new link under a temporary name, renamed over it.
fn set_link(model_dir: &Path, link: &str, version: &str) -> Result<()> {
    let tmp = model_dir.join(format!(".{link}.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    fs::rename(&tmp, model_dir.join(link))
        .with_context(|| format!("cannot replace {}", model_dir.join(link).display()))?;
    sync_dir(model_dir)
}

/// Removes what an interrupted install left: staging copies and temporary links.
fn remove_staging_leftovers(model_dir: &Path) {
    let Ok(entries) = fs::read_dir(model_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with(STAGING_PREFIX) {
            let _ = fs::remove_dir_all(&path);
        } else if name.starts_with(MOVED_PREFIX) {
            tracing::warn!(
                "{} is a bundle an interrupted `install --move` moved here: install it again from there, or remove it",
                path.display()
            );
        } else if name.starts_with(&format!(".{CURRENT}."))
            || name.starts_with(&format!(".{PREVIOUS}."))
        {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Keeps the current and previous versions; removes the others (edge boxes have little disk).
fn prune(model_dir: &Path) {
    let keep = [
        link_target(model_dir, CURRENT),
        link_target(model_dir, PREVIOUS),
    ];
    let Ok(entries) = fs::read_dir(model_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_version =
            entry.file_type().map(|t| t.is_dir()).unwrap_or(false) && !name.starts_with('.');
        if is_version && !keep.iter().flatten().any(|k| *k == name) {
            if let Err(e) = fs::remove_dir_all(entry.path()) {
                tracing::warn!("cannot remove old version {}: {e}", entry.path().display());
            }
        }
    }
}

fn failpoint(step: &str) {
    if std::env::var(FAILPOINT_ENV).ok().as_deref() == Some(&format!("install:{step}")) {
        // Exit on the spot, as a kill would: no destructor, no cleanup (and no core file).
        eprintln!("{FAILPOINT_ENV}: stopping after {step}");
        std::process::exit(86);
    }
}
