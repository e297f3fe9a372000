//! Function documentation from Rhai's metadata: signatures and doc comments.

use serde::Deserialize;

#[derive(Debug, Clone)]
pub struct FunctionDoc {
    pub name: String,
    pub signature: String,
    pub doc: String,
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
            name: f.name,
            signature: readable_signature(&f.signature),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.signature.cmp(&b.signature)));
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
    fn signatures_use_script_names() {
        assert_eq!(
            readable_signature("clamp(t: &mut Tensor, lo: Dynamic, hi: i64) -> ScriptResult<Map>"),
            "clamp(t: Tensor, lo: ?, hi: int) -> Map"
        );
    }
}
