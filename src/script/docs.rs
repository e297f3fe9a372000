//! Function documentation from Rhai's metadata: signatures and doc comments.

use serde::Deserialize;

use crate::script::declared::OptionDoc;

#[derive(Debug, Clone)]
pub struct FunctionDoc {
    pub name: String,
    pub signature: String,
    pub doc: String,
    /// The keys its option map accepts, when a core config struct declares them.
    pub options: Vec<OptionDoc>,
}

impl FunctionDoc {
    /// The signature, then the doc and the options indented (`lpo fns`, the REPL's `:help`).
    pub fn to_text(&self) -> String {
        let mut text = format!("{}\n", self.signature);
        for line in self.doc.lines() {
            text.push_str(&format!("    {line}\n"));
        }
        if !self.options.is_empty() {
            text.push_str("    options:\n");
        }
        for o in &self.options {
            let default = o
                .default
                .as_deref()
                .map(|d| format!(" = {d}"))
                .unwrap_or_default();
            let doc = if o.doc.is_empty() {
                String::new()
            } else {
                format!(" — {}", o.doc)
            };
            text.push_str(&format!("      {}: {}{default}{doc}\n", o.name, o.kind));
        }
        text
    }
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    functions: Vec<FnMeta>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FnMeta {
    name: String,
    signature: String,
    #[serde(default)]
    doc_comments: Vec<String>,
}

/// Every function in `metadata_json` (from `Engine::gen_fn_metadata_to_json`), sorted by name;
/// operator overloads and `to_string`-style hooks are left out.
pub fn functions(metadata_json: &str) -> Vec<FunctionDoc> {
    let meta: Metadata = match serde_json::from_str(metadata_json) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    let declared = crate::script::bindings::declared_options();
    let type_names = crate::script::bindings::script_type_names();
    let mut out: Vec<FunctionDoc> = meta
        .functions
        .into_iter()
        .filter(|f| {
            f.name
                .chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
        })
        .map(|f| FunctionDoc {
            doc: f
                .doc_comments
                .iter()
                .flat_map(|c| c.lines())
                .map(|l| {
                    l.trim_start_matches("///")
                        .trim_start_matches("/**")
                        .trim_end_matches("*/")
                        .trim()
                        .to_string()
                })
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("\n"),
            options: declared
                .iter()
                .find(|(name, _)| *name == f.name)
                .map(|(_, o)| o.clone())
                .unwrap_or_default(),
            name: f.name,
            signature: script_type_names_in(&readable_signature(&f.signature), &type_names),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.signature.cmp(&b.signature)));
    out
}

/// Host types by the names scripts know them by (`ScriptLrm` -> `Lrm`), whole words only.
pub fn script_type_names_in(sig: &str, names: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(sig.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let renamed = names.iter().find(|(rust, _)| *rust == word.as_str());
        out.push_str(renamed.map_or(word.as_str(), |(_, script)| script));
        word.clear();
    };
    for c in sig.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Rhai's signatures name Rust types; show the script's names instead.
pub fn readable_signature(sig: &str) -> String {
    let mut s = sig.to_string();
    for (from, to) in [
        ("ScriptResult<", "Result<"),
        ("&mut ", ""),
        ("&str", "String"),
        ("ImmutableString", "String"),
        ("i64", "int"),
        ("f64", "float"),
        ("ScriptRng", "Rng"),
        ("Dynamic", "?"),
        ("rhai::", ""),
        ("candle_core::", ""),
    ] {
        s = s.replace(from, to);
    }
    // `Result<T>` in a signature only means the call can fail: show T.
    while let Some(start) = s.find("Result<") {
        let body = start + "Result<".len();
        let mut depth = 1;
        let mut end = body;
        for (i, c) in s[body..].char_indices() {
            match c {
                '<' => depth += 1,
                '>' => {
                    depth -= 1;
                    if depth == 0 {
                        end = body + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        if depth != 0 {
            break;
        }
        s = format!("{}{}{}", &s[..start], &s[body..end], &s[end + 1..]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_types_show_their_script_names() {
        let names = [("ScriptLrm", "Lrm"), ("ScriptPolicy", "LpoPolicy")];
        assert_eq!(
            script_type_names_in(
                "score(lrm: ScriptLrm, p: ScriptPolicy) -> ScriptLrmX",
                &names
            ),
            "score(lrm: Lrm, p: LpoPolicy) -> ScriptLrmX"
        );
    }

    #[test]
    fn signatures_use_script_names() {
        assert_eq!(
            readable_signature("clamp(t: &mut Tensor, lo: Dynamic, hi: i64) -> ScriptResult<Map>"),
            "clamp(t: Tensor, lo: ?, hi: int) -> Map"
        );
    }
}
