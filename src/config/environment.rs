//! Settings an environment variable may give, and the one precedence rule every setting
//! follows, as in other daemons: command-line flag > environment variable > config file >
//! built-in default. Backends never read the environment: they get the resolved value.

use std::fmt::Display;
use std::path::PathBuf;
use std::str::FromStr;

use super::ConfigError;

/// Native kernel set: `auto`, `generic` or a tier name (`--kernels`, `[model] kernels`).
pub const KERNELS: &str = "QWEN2_EDGE_KERNELS";
/// Native KV cache element type: `f32` or `f16` (`--kv-cache`, `[model] kv_cache`).
pub const KV_CACHE: &str = "QWEN2_EDGE_KV_CACHE";
/// The ONNX Runtime library (`--ort-library`, `[ort] library`); the `ort` crate's own name.
pub const ORT_LIBRARY: &str = "ORT_DYLIB_PATH";

/// One setting: `flag` if given, else the environment variable `env` if set and not empty,
/// else `below` (the config file's value, which already holds the default when the file
/// does not name it). An unparsable variable is an error naming it.
pub fn layered<T>(flag: Option<T>, env: &str, below: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: Display,
{
    resolve(flag, env, std::env::var(env).ok(), below)
}

/// `layered` with the variable's value given (`None`: unset), so tests need not change the
/// process environment, which other threads read.
fn resolve<T>(flag: Option<T>, env: &str, value: Option<String>, below: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: Display,
{
    match (flag, value) {
        (Some(flag), _) => Ok(flag),
        (None, Some(text)) if !text.is_empty() => text
            .parse()
            .map_err(|e| ConfigError(format!("{env}={text:?}: {e}"))),
        (None, _) => Ok(below),
    }
}

/// A path setting that may be absent everywhere: `flag`, else the variable, else `below`.
pub fn layered_path(flag: Option<PathBuf>, env: &str, below: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| {
        std::env::var_os(env)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .or(below)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_environment_beats_config() {
        let env = || Some("env".to_string());
        let s = |v: &str| v.to_string();
        assert_eq!(
            resolve(Some(s("flag")), "V", env(), s("config")).unwrap(),
            "flag"
        );
        assert_eq!(resolve(None, "V", env(), s("config")).unwrap(), "env");
        assert_eq!(resolve(None, "V", None, s("config")).unwrap(), "config");
        let empty = Some(String::new());
        let unset = resolve(None, "V", empty, s("config")).unwrap();
        assert_eq!(unset, "config", "an empty variable counts as unset");
    }

    #[test]
    fn a_bad_environment_value_names_the_variable() {
        let e = resolve::<u32>(None, "QWEN2_EDGE_X", Some("many".into()), 1)
            .unwrap_err()
            .0;
        assert!(e.starts_with("QWEN2_EDGE_X=\"many\": "), "{e}");
        // A flag wins without the variable being parsed at all.
        assert_eq!(
            resolve(Some(2u32), "QWEN2_EDGE_X", Some("many".into()), 1).unwrap(),
            2
        );
    }
}
