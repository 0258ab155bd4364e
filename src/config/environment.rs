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
    if let Some(value) = flag {
        return Ok(value);
    }
    match std::env::var(env) {
        Ok(text) if !text.is_empty() => text
            .parse()
            .map_err(|e| ConfigError(format!("{env}={text:?}: {e}"))),
        _ => Ok(below),
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

    // Each test owns its variable: the unit tests run in parallel threads of one process.

    #[test]
    fn flag_beats_environment_beats_config() {
        const VAR: &str = "QWEN2_EDGE_TEST_PRECEDENCE";
        std::env::set_var(VAR, "env");
        let flag = layered(Some("flag".to_string()), VAR, "config".to_string());
        assert_eq!(flag.unwrap(), "flag");
        let env = layered(None, VAR, "config".to_string());
        assert_eq!(env.unwrap(), "env");
        std::env::set_var(VAR, "");
        let config = layered(None, VAR, "config".to_string());
        assert_eq!(
            config.unwrap(),
            "config",
            "an empty variable counts as unset"
        );
        std::env::remove_var(VAR);
    }

    #[test]
    fn a_bad_environment_value_names_the_variable() {
        const VAR: &str = "QWEN2_EDGE_TEST_BAD_VALUE";
        std::env::set_var(VAR, "many");
        let e = layered::<u32>(None, VAR, 1).unwrap_err().0;
        assert!(e.starts_with("QWEN2_EDGE_TEST_BAD_VALUE=\"many\": "), "{e}");
        std::env::remove_var(VAR);
    }
}
