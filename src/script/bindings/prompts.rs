//! Prompt files in scripts: `read_prompts(path)`.

use rhai::plugin::*;

/// Prompts of a file: a JSON list of `{caption}` (or `{prompt}`) objects or strings (the paper's
/// 4k prompts), or plain text with one prompt per line (blank lines skipped).
pub fn parse_prompts(text: &str, path: &str) -> Result<Vec<String>, String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        // A JSON object (or JSON lines) is not a prompt; one line of it would pass as one.
        return Err(format!(
            "{path}: starts with `{{`, so it is JSON but not a list; accepted: a JSON list of \
             strings or of {{\"caption\": ...}} (or {{\"prompt\": ...}}) objects, or plain text \
             with one prompt per line"
        ));
    }
    let prompts: Vec<String> = if trimmed.starts_with('[') {
        json_prompts(text, path)?
    } else {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    };
    if prompts.is_empty() {
        return Err(format!("{path}: the prompt file holds no prompts"));
    }
    Ok(prompts)
}

/// The prompts of a JSON list of strings or `{caption}` / `{prompt}` objects.
fn json_prompts(text: &str, path: &str) -> Result<Vec<String>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("{path}: invalid JSON: {e}"))?;
    let items = value
        .as_array()
        .ok_or_else(|| format!("{path}: expected a JSON list"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Object(o) => o
                .get("caption")
                .or_else(|| o.get("prompt"))
                .and_then(|v| v.as_str())
                .map(String::from)
                .ok_or_else(|| format!("{path}: item {i} has no string `caption` (or `prompt`)")),
            other => Err(format!(
                "{path}: item {i} is {other}, expected a string or {{\"caption\": ...}}"
            )),
        })
        .collect()
}

#[export_module]
pub mod prompts_api {
    use rhai::{Array, Dynamic};

    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// Prompts from a file: a JSON list of `{caption}` objects (or strings), as the paper's 4k
    /// prompts, or plain text with one prompt per line. An error when it holds none, or when it
    /// starts with `{` (a JSON object is not a prompt list).
    #[rhai_fn(return_raw, volatile)]
    pub fn read_prompts(ctx: NativeCallContext, path: &str) -> ScriptResult<Array> {
        let text = Host::of(&ctx)
            .read_text(path)
            .map_err(|e| format!("read_prompts: {e}"))
            .or_script(&ctx)?;
        let prompts = super::parse_prompts(&text, path).or_script(&ctx)?;
        Ok(prompts.into_iter().map(Dynamic::from).collect())
    }
}
