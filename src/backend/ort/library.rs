//! Finding, checking and loading the ONNX Runtime shared library, once per process.
//!
//! The `ort` crate is built with `load-dynamic`: nothing is linked or downloaded at build time,
//! and the library is opened here, explicitly, before any other `ort` call. Its implicit loader
//! would panic at first use when the library is missing; this module turns every failure
//! (missing file, not ONNX Runtime, too old) into an error that names the path, the version
//! found and how to get a library, at start-up rather than in a worker.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use ort::environment::Environment;

use crate::config::environment::ORT_LIBRARY;

/// The oldest ONNX Runtime the `ort` crate's `api-17` level accepts. JetPack 5 and 6 ship
/// onnxruntime-gpu 1.17-1.20 wheels, so a higher API level would lock those boxes out.
pub const MIN_MINOR: u32 = ort::MINOR_VERSION;

/// How to get a library, appended to every "not found" error.
pub const HOW_TO_GET: &str = "get one from the `onnxruntime` (CPU) or `onnxruntime-gpu` \
    (CUDA, TensorRT) Python wheel, which ships onnxruntime/capi/libonnxruntime.so.<version> \
    (scripts/lib.sh's ensure_ort_lib prints its path), or from an ONNX Runtime release archive \
    (lib/libonnxruntime.so); then set [ort] library, --ort-library or ORT_DYLIB_PATH";

/// The loaded library and the process-wide ONNX Runtime environment.
pub struct Runtime {
    pub path: PathBuf,
    pub version: String,
    pub env: Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

/// Where the library comes from, for error messages.
#[derive(Debug, Clone, Copy)]
enum Origin {
    Config,
    Env,
    Search,
}

/// Loads ONNX Runtime (first call) or returns the one already loaded. `configured` is the
/// `[ort] library` / `--ort-library` setting.
pub fn runtime(configured: Option<&Path>) -> Result<&'static Runtime> {
    // One loader at a time: two sessions starting together must not open two libraries.
    let _guard = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    let (path, origin) = locate(configured)?;
    if let Some(rt) = RUNTIME.get() {
        if !same_file(&rt.path, &path) {
            bail!(
                "ONNX Runtime is already loaded from {} in this process; cannot also load {}",
                rt.path.display(),
                path.display()
            );
        }
        return Ok(rt);
    }
    let version = probe(&path, origin)?;
    ort::init_from(&path)
        .map_err(|e| anyhow!("cannot load ONNX Runtime from {}: {e}", path.display()))?
        .with_name("qwen2-edge")
        .with_telemetry(false)
        .build()
        .map(|env| {
            tracing::info!(path = %path.display(), %version, "ONNX Runtime loaded");
            RUNTIME.get_or_init(|| Runtime { path, version, env })
        })
        .map_err(|e| anyhow!("cannot start ONNX Runtime: {e}"))
}

/// Configured path, then ORT_DYLIB_PATH, then the well-known places.
fn locate(configured: Option<&Path>) -> Result<(PathBuf, Origin)> {
    if let Some(path) = configured {
        if !path.is_file() {
            bail!(
                "ONNX Runtime library {} (from --ort-library, ORT_DYLIB_PATH or [ort] library) does not exist; {HOW_TO_GET}",
                path.display()
            );
        }
        return Ok((path.to_path_buf(), Origin::Config));
    }
    if let Some(env) = std::env::var_os(ORT_LIBRARY).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(env);
        if !path.is_file() {
            bail!(
                "ONNX Runtime library {} (from ORT_DYLIB_PATH) does not exist; {HOW_TO_GET}",
                path.display()
            );
        }
        return Ok((path, Origin::Env));
    }
    let dirs = search_dirs();
    for dir in &dirs {
        if let Some(found) = library_in(dir) {
            return Ok((found, Origin::Search));
        }
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "no ONNX Runtime library found (searched {}); {HOW_TO_GET}",
        searched.join(", ")
    )
}

/// Well-known install places: beside the binary, the package's own directory, system library
/// directories, and the onnxruntime Python wheel's directory (how JetPack boxes usually have it).
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("../lib/qwen2-edge"));
        dirs.push(exe_dir.clone());
    }
    for d in [
        "/usr/lib/qwen2-edge",
        "/usr/local/lib",
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/opt/onnxruntime/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    for parent in ["/usr/local/lib", "/usr/lib"] {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        pythons.sort();
        for py in pythons {
            for sub in ["dist-packages", "site-packages"] {
                dirs.push(py.join(sub).join("onnxruntime/capi"));
            }
        }
    }
    dirs
}

/// `libonnxruntime.so`, else the newest `libonnxruntime.so.1.x.y`, in `dir`.
fn library_in(dir: &Path) -> Option<PathBuf> {
    let plain = dir.join("libonnxruntime.so");
    if plain.is_file() {
        return Some(plain);
    }
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("libonnxruntime.so.")?;
            let key: Vec<u32> = version
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            Some((key, e.path()))
        })
        .filter(|(_, p)| p.is_file())
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, p)| p)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Opens the library on its own and reads its version, so a library that is not ONNX Runtime
/// or is too old is refused with its path and version before `ort` sees it.
fn probe(path: &Path, origin: Origin) -> Result<String> {
    let from = match origin {
        Origin::Config => " (from --ort-library, ORT_DYLIB_PATH or [ort] library)",
        Origin::Env => " (from ORT_DYLIB_PATH)",
        Origin::Search => "",
    };
    // SAFETY: loading a shared library runs its initializers; the path is the operator's
    // choice of ONNX Runtime library, which is what this backend exists to run.
    let lib = unsafe { libloading::Library::new(path) }.with_context(|| {
        format!(
            "cannot open ONNX Runtime library {}{from}; {HOW_TO_GET}",
            path.display()
        )
    })?;
    type GetApiBase = unsafe extern "C" fn() -> *const ort::sys::OrtApiBase;
    // SAFETY: `OrtGetApiBase` has this signature in every ONNX Runtime release.
    let get_base: libloading::Symbol<GetApiBase> =
        unsafe { lib.get(b"OrtGetApiBase\0") }.map_err(|_| {
            anyhow!(
                "{}{from} is not an ONNX Runtime library (no OrtGetApiBase symbol); {HOW_TO_GET}",
                path.display()
            )
        })?;
    // SAFETY: the symbol came from the library above; ONNX Runtime returns a static struct
    // whose GetVersionString returns a static NUL-terminated string.
    let version = unsafe {
        let base = get_base();
        if base.is_null() {
            bail!("{}{from}: OrtGetApiBase returned nothing", path.display());
        }
        let s = ((*base).GetVersionString)();
        if s.is_null() {
            bail!("{}{from}: ONNX Runtime reports no version", path.display());
        }
        CStr::from_ptr(s).to_string_lossy().into_owned()
    };
    let minor = parse_minor(&version).ok_or_else(|| {
        anyhow!(
            "{}{from}: cannot read the ONNX Runtime version {version:?}",
            path.display()
        )
    })?;
    if minor < MIN_MINOR {
        bail!(
            "ONNX Runtime {version} at {}{from} is too old: qwen2-edge needs 1.{MIN_MINOR} or newer; {HOW_TO_GET}",
            path.display()
        );
    }
    // Keep it open: `ort` opens the same file next, and unloading ONNX Runtime in between
    // would run its static destructors for nothing.
    std::mem::forget(lib);
    Ok(version)
}

/// The minor version of "1.x.y" (major 1 only: ONNX Runtime has never had another).
pub fn parse_minor(version: &str) -> Option<u32> {
    let mut parts = version.trim().split('.');
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    (major == 1).then_some(minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_minor("1.17.3"), Some(17));
        assert_eq!(parse_minor("1.32.0"), Some(32));
        assert_eq!(parse_minor("2.0.0"), None);
        assert_eq!(parse_minor("garbage"), None);
    }

    #[test]
    fn finds_the_newest_versioned_library() {
        let dir = std::env::temp_dir().join(format!("qwen2-edge-ortlib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "libonnxruntime.so.1.9.0",
            "libonnxruntime.so.1.17.3",
            "libonnxruntime_providers_shared.so",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        assert_eq!(library_in(&dir), Some(dir.join("libonnxruntime.so.1.17.3")));
        std::fs::write(dir.join("libonnxruntime.so"), b"").unwrap();
        assert_eq!(library_in(&dir), Some(dir.join("libonnxruntime.so")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_library_is_a_clear_error() {
        let path =
            std::env::temp_dir().join(format!("qwen2-edge-notalib-{}.so", std::process::id()));
        std::fs::write(&path, b"not an ELF file").unwrap();
        let err = probe(&path, Origin::Config).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("cannot open ONNX Runtime library"), "{text}");
        assert!(text.contains("onnxruntime-gpu"), "{text}");
        std::fs::remove_file(&path).unwrap();
    }
}
