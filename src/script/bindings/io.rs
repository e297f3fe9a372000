//! Files: safetensors maps of tensors, JSON values.

use rhai::plugin::*;

#[export_module]
pub mod io_api {
    use rhai::{Array, Dynamic, Map};

    use crate::script::convert::{tensors_from_map, tensors_to_map};
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;
    use crate::tensor::io;

    /// Every tensor of a safetensors file, as a map name -> tensor.
    #[rhai_fn(return_raw, volatile)]
    pub fn load_safetensors(ctx: NativeCallContext, path: &str) -> ScriptResult<Map> {
        let tensors = io::load_safetensors(
            &Host::of(&ctx).readable(path).or_script(&ctx)?,
            &Host::of(&ctx).device,
        )
        .or_script(&ctx)?;
        Ok(tensors_to_map(tensors))
    }

    /// Write a map name -> tensor as a safetensors file (atomically).
    #[rhai_fn(return_raw)]
    pub fn save_safetensors(ctx: NativeCallContext, tensors: Map, path: &str) -> ScriptResult<()> {
        let out = tensors_from_map(&tensors, "save_safetensors", false).or_script(&ctx)?;
        let path = Host::of(&ctx).writable(path).or_script(&ctx)?;
        io::save_safetensors(&out, &path).or_script(&ctx)
    }

    /// Hex SHA-256 of a file's or folder's contents (folders walked in sorted order): a cache
    /// key that changes when a model's weights, config or tokenizer change.
    #[rhai_fn(name = "content_digest", return_raw, volatile)]
    pub fn content_digest(ctx: NativeCallContext, path: &str) -> ScriptResult<String> {
        let path = Host::of(&ctx).readable(path).or_script(&ctx)?;
        crate::fsutil::content_digest(&[path.as_path()]).or_script(&ctx)
    }

    /// The digest of several files or folders together (in the given order).
    #[rhai_fn(name = "content_digest", return_raw, volatile)]
    pub fn content_digest_all(ctx: NativeCallContext, paths: Array) -> ScriptResult<String> {
        let paths: Vec<String> = paths
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                p.into_string()
                    .map_err(|t| format!("content_digest: path {i} is a {t}, not a string"))
            })
            .collect::<Result<_, _>>()
            .or_script(&ctx)?;
        let host = Host::of(&ctx);
        let paths = paths
            .iter()
            .map(|p| host.readable(p))
            .collect::<Result<Vec<_>, _>>()
            .or_script(&ctx)?;
        let refs: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
        crate::fsutil::content_digest(&refs).or_script(&ctx)
    }

    /// True when a file or folder exists at `path` (an error for a path the script may not read).
    #[rhai_fn(return_raw, volatile)]
    pub fn path_exists(ctx: NativeCallContext, path: &str) -> ScriptResult<bool> {
        Ok(Host::of(&ctx).readable(path).or_script(&ctx)?.exists())
    }

    /// A value read from a JSON file (objects become maps, arrays arrays).
    #[rhai_fn(return_raw, volatile)]
    pub fn read_json(ctx: NativeCallContext, path: &str) -> ScriptResult<Dynamic> {
        let text = Host::of(&ctx).read_text(path).or_script(&ctx)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{path}: invalid JSON: {e}"))
            .or_script(&ctx)?;
        rhai::serde::to_dynamic(value).or_script(&ctx)
    }

    /// Write a value as pretty JSON (atomically).
    #[rhai_fn(return_raw)]
    pub fn write_json(ctx: NativeCallContext, value: Dynamic, path: &str) -> ScriptResult<()> {
        let json: serde_json::Value = rhai::serde::from_dynamic(&value).or_script(&ctx)?;
        let text = serde_json::to_string_pretty(&json).or_script(&ctx)?;
        let path = Host::of(&ctx).writable(path).or_script(&ctx)?;
        crate::fsutil::atomic_write(&path, text.as_bytes()).or_script(&ctx)
    }
}
