//! Options declared once, by the core config struct that holds them.
//!
//! A config struct derives `Deserialize` (with `#[serde(default)]`), `Serialize` and
//! `schemars::JsonSchema`; its serde field names are the option names scripts write, its
//! `Default` gives the defaults and its doc comments the docs. From that one declaration,
//! [`from_map`] checks a script's option map (unknown keys named with the accepted list, ints
//! accepted where floats are expected, a wrong type named with its key) and builds the struct,
//! [`to_map`] turns a result struct into the map a script sees, and [`option_docs`] lists the
//! options for `lpo fns` and docs/API.md.

use rhai::{Dynamic, Map};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::script::suggest::did_you_mean;

/// One declared option, as the docs show it.
#[derive(Debug, Clone, PartialEq)]
pub struct OptionDoc {
    pub name: String,
    /// The type a script writes: `float`, `int`, `bool`, `string`, `array`, `map`, one of the
    /// choices (`"static" | "sigma"`), with `|()` when it may be left unset.
    pub kind: String,
    /// The default as the script would write it; None when the option has none (unset).
    pub default: Option<String>,
    pub doc: String,
}

/// The options `T` declares, sorted by name.
pub fn option_docs<T: JsonSchema>() -> Vec<OptionDoc> {
    let schema = Schema::of::<T>();
    schema
        .properties()
        .map(|(name, prop)| {
            let prop = schema.resolve(prop);
            OptionDoc {
                name: name.clone(),
                kind: Kind::of(&schema, prop).describe(),
                default: prop
                    .get("default")
                    .filter(|v| !v.is_null())
                    .map(script_literal),
                doc: prop
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            }
        })
        .collect()
}

/// The option names `T` declares.
pub fn option_names<T: JsonSchema>() -> Vec<String> {
    option_docs::<T>().into_iter().map(|o| o.name).collect()
}

/// Build `T` from a script's option map: keys `T` does not declare are an error naming the
/// accepted ones; `()` means "use the default".
pub fn from_map<T: DeserializeOwned + JsonSchema>(map: &Map, func: &str) -> Result<T, String> {
    from_map_with::<T>(map, func, &[]).map(|(value, _)| value)
}

/// Like [`from_map`], for functions that also take host objects in their options (an RNG, a
/// scheduler, a callback): the keys in `host_keys` are accepted, left out of `T` and returned.
pub fn from_map_with<T: DeserializeOwned + JsonSchema>(
    map: &Map,
    func: &str,
    host_keys: &[&str],
) -> Result<(T, Map), String> {
    let schema = Schema::of::<T>();
    let declared: Vec<&str> = schema.properties().map(|(k, _)| k.as_str()).collect();
    let mut unknown: Vec<&str> = map
        .keys()
        .map(|k| k.as_str())
        .filter(|k| !declared.contains(k) && !host_keys.contains(k))
        .collect();
    if !unknown.is_empty() {
        unknown.sort();
        let mut accepted: Vec<&str> = declared.iter().chain(host_keys).copied().collect();
        accepted.sort();
        return Err(format!(
            "{func}: unknown option{} {}; accepted: {}",
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|k| format!("`{k}`{}", did_you_mean(k, &accepted)))
                .collect::<Vec<_>>()
                .join(", "),
            accepted.join(", ")
        ));
    }
    let mut json = serde_json::Map::new();
    let mut host = Map::new();
    for (key, value) in map {
        if host_keys.contains(&key.as_str()) {
            host.insert(key.clone(), value.clone());
            continue;
        }
        if value.is_unit() {
            continue;
        }
        let prop = schema
            .properties()
            .find(|(k, _)| k.as_str() == key.as_str())
            .map(|(_, p)| schema.resolve(p))
            .unwrap_or(&Value::Null);
        let kind = Kind::of(&schema, prop);
        json.insert(
            key.to_string(),
            kind.check(value)
                .map_err(|expected| wrong_type(func, key, &expected, value))?,
        );
    }
    let value: T = serde_path_to_error::deserialize(Value::Object(json)).map_err(|e| {
        // Inside a `#[serde(flatten)]` field serde loses the key; the message still names the value.
        match e.path().to_string() {
            key if key.is_empty() || key == "." => {
                format!("{func}: options: {}", readable_serde_error(e.inner()))
            }
            key => format!(
                "{func}: option `{key}`: {}",
                readable_serde_error(e.inner())
            ),
        }
    })?;
    Ok((value, host))
}

/// A result struct as the map a script sees (through its serde field names).
pub fn to_map<T: Serialize>(value: &T) -> Result<Map, String> {
    let dynamic = rhai::serde::to_dynamic(value).map_err(|e| e.to_string())?;
    dynamic
        .try_cast::<Map>()
        .ok_or_else(|| "to_map: the value is not a struct".to_string())
}

fn wrong_type(func: &str, key: &str, expected: &str, value: &Dynamic) -> String {
    format!(
        "{func}: option `{key}` must be {expected}, got {} ({value})",
        value.type_name()
    )
}

fn readable_serde_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let text = text.split(" at line ").next().unwrap_or(&text).to_string();
    ["f64", "f32"]
        .iter()
        .fold(text, |t, ty| {
            t.replace(&format!("expected {ty}"), "expected a number")
        })
        .replace("expected usize", "expected an integer >= 0")
        .replace("expected u64", "expected an integer >= 0")
        .replace("expected u32", "expected an integer >= 0")
        .replace("expected i64", "expected an integer")
}

/// A default value as a script would write it.
fn script_literal(v: &Value) -> String {
    match v {
        Value::Null => "()".into(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(script_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) => format!(
            "#{{{}}}",
            o.iter()
                .map(|(k, v)| format!("{k}: {}", script_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or_default();
            if x.fract() == 0.0 && x.abs() < 1e15 {
                format!("{x:.1}")
            } else {
                format!("{x}")
            }
        }
        other => other.to_string(),
    }
}

/// The JSON schema of a config struct, with its `$defs` for nested types.
struct Schema(Value);

impl Schema {
    fn of<T: JsonSchema>() -> Self {
        Self(schemars::schema_for!(T).to_value())
    }

    fn properties(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
    }

    /// Follow a `$ref` (and a one-element `allOf` wrapper) to the definition it names.
    fn resolve<'a>(&'a self, prop: &'a Value) -> &'a Value {
        let target = prop
            .get("$ref")
            .or_else(|| prop.get("allOf")?.as_array()?.first()?.get("$ref"))
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
            .and_then(|name| self.0.get("$defs")?.get(name));
        match target {
            // The property's own default and docs win over the definition's.
            Some(def) if prop.get("default").is_none() && prop.get("description").is_none() => def,
            Some(_) => prop,
            None => prop,
        }
    }

    fn definition<'a>(&'a self, prop: &'a Value) -> &'a Value {
        prop.get("$ref")
            .or_else(|| prop.get("allOf")?.as_array()?.first()?.get("$ref"))
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
            .and_then(|name| self.0.get("$defs")?.get(name))
            .unwrap_or(prop)
    }
}

/// What a script may pass for one option.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Float,
    Int { unsigned: bool },
    Bool,
    Str,
    Choice(Vec<String>),
    Array,
    Map,
    Any,
    Nullable(Box<Kind>),
}

impl Kind {
    fn of(schema: &Schema, prop: &Value) -> Kind {
        let def = schema.definition(prop);
        if let Some(choices) = choices(def) {
            return Kind::Choice(choices);
        }
        if let Some(any_of) = def.get("anyOf").and_then(Value::as_array) {
            let non_null: Vec<&Value> = any_of
                .iter()
                .filter(|v| v.get("type") != Some(&Value::String("null".into())))
                .collect();
            if non_null.len() == 1 && non_null.len() < any_of.len() {
                return Kind::Nullable(Box::new(Kind::of(schema, non_null[0])));
            }
            return Kind::Any;
        }
        let types: Vec<&str> = match def.get("type") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let nullable = types.contains(&"null");
        let unsigned = def
            .get("format")
            .and_then(Value::as_str)
            .is_some_and(|f| f.starts_with("uint"))
            || def.get("minimum").and_then(Value::as_f64) == Some(0.0);
        let base = match types.iter().find(|t| **t != "null").copied() {
            Some("number") => Kind::Float,
            Some("integer") => Kind::Int { unsigned },
            Some("boolean") => Kind::Bool,
            Some("string") => Kind::Str,
            Some("array") => Kind::Array,
            Some("object") => Kind::Map,
            _ => Kind::Any,
        };
        if nullable {
            Kind::Nullable(Box::new(base))
        } else {
            base
        }
    }

    fn describe(&self) -> String {
        match self {
            Kind::Float => "float".into(),
            Kind::Int { .. } => "int".into(),
            Kind::Bool => "bool".into(),
            Kind::Str => "string".into(),
            Kind::Choice(c) => c
                .iter()
                .map(|c| format!("{c:?}"))
                .collect::<Vec<_>>()
                .join(" | "),
            Kind::Array => "array".into(),
            Kind::Map => "map".into(),
            Kind::Any => "any".into(),
            Kind::Nullable(inner) => format!("{}|()", inner.describe()),
        }
    }

    /// The value as JSON if a script may pass it here; else what was expected.
    fn check(&self, v: &Dynamic) -> Result<Value, String> {
        match self {
            Kind::Nullable(inner) => inner.check(v),
            Kind::Float => {
                let x = v
                    .as_float()
                    .ok()
                    .or_else(|| v.as_int().ok().map(|i| i as f64))
                    .ok_or("a number")?;
                serde_json::Number::from_f64(x)
                    .map(Value::Number)
                    .ok_or_else(|| "a finite number".to_string())
            }
            Kind::Int { unsigned } => {
                let i = v.as_int().map_err(|_| "an integer")?;
                if *unsigned && i < 0 {
                    return Err("an integer >= 0".into());
                }
                Ok(Value::from(i))
            }
            Kind::Bool => v
                .as_bool()
                .map(Value::Bool)
                .map_err(|_| "true or false".into()),
            Kind::Str => string(v).ok_or_else(|| "a string".into()),
            Kind::Choice(choices) => {
                let s = string(v).ok_or_else(|| format!("one of: {}", choices.join(", ")))?;
                match s.as_str() {
                    Some(text) if choices.iter().any(|c| c == text) => Ok(s),
                    _ => Err(format!("one of: {}", choices.join(", "))),
                }
            }
            Kind::Array if !v.is_array() => Err("an array".into()),
            Kind::Map if !v.is_map() => Err("a map".into()),
            Kind::Array | Kind::Map | Kind::Any => {
                to_json(v).ok_or_else(|| "plain data (numbers, strings, arrays, maps)".into())
            }
        }
    }
}

fn string(v: &Dynamic) -> Option<Value> {
    v.clone()
        .into_string()
        .ok()
        .or_else(|| v.as_char().ok().map(String::from))
        .map(Value::String)
}

/// The choices of a string enum: `enum: [...]`, or `oneOf` of `const`s (variants with docs).
fn choices(def: &Value) -> Option<Vec<String>> {
    if let Some(e) = def.get("enum").and_then(Value::as_array) {
        return e.iter().map(|v| v.as_str().map(String::from)).collect();
    }
    let one_of = def.get("oneOf")?.as_array()?;
    one_of
        .iter()
        .map(|v| {
            v.get("const")
                .and_then(Value::as_str)
                .map(String::from)
                .or_else(|| {
                    let e = v.get("enum")?.as_array()?;
                    (e.len() == 1).then(|| e[0].as_str().map(String::from))?
                })
        })
        .collect()
}

/// Plain script data as JSON (`()` inside arrays and maps is null).
fn to_json(v: &Dynamic) -> Option<Value> {
    if v.is_unit() {
        return Some(Value::Null);
    }
    if let Ok(i) = v.as_int() {
        return Some(Value::from(i));
    }
    if let Ok(x) = v.as_float() {
        return serde_json::Number::from_f64(x).map(Value::Number);
    }
    if let Ok(b) = v.as_bool() {
        return Some(Value::Bool(b));
    }
    if let Some(s) = string(v) {
        return Some(s);
    }
    if v.is_array() {
        let a = v.clone().cast::<rhai::Array>();
        return a
            .iter()
            .map(to_json)
            .collect::<Option<Vec<_>>>()
            .map(Value::Array);
    }
    if v.is_map() {
        let m = v.clone().cast::<Map>();
        return m
            .iter()
            .map(|(k, v)| Some((k.to_string(), to_json(v)?)))
            .collect::<Option<serde_json::Map<_, _>>>()
            .map(Value::Object);
    }
    None
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Static,
        Sigma,
    }

    /// Test options.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[serde(default)]
    struct Opts {
        /// KL weight.
        beta: f64,
        /// Candidates per step.
        k: usize,
        mode: Mode,
        /// Optional clip.
        clip: Option<f64>,
        name: String,
    }

    impl Default for Opts {
        fn default() -> Self {
            Self {
                beta: 1.0,
                k: 4,
                mode: Mode::Sigma,
                clip: None,
                name: "x".into(),
            }
        }
    }

    fn map(pairs: &[(&str, Dynamic)]) -> Map {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), v.clone()))
            .collect()
    }

    #[test]
    fn defaults_ints_as_floats_and_units() {
        let m = map(&[("beta", Dynamic::from(500_i64)), ("clip", Dynamic::UNIT)]);
        let o: Opts = from_map(&m, "f").unwrap();
        assert_eq!(
            o,
            Opts {
                beta: 500.0,
                ..Opts::default()
            }
        );
        let m = map(&[
            ("clip", Dynamic::from(2.5_f64)),
            ("mode", Dynamic::from("static")),
        ]);
        let o: Opts = from_map(&m, "f").unwrap();
        assert_eq!((o.clip, o.mode), (Some(2.5), Mode::Static));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let m = map(&[("bta", Dynamic::from(1_i64))]);
        let err = from_map::<Opts>(&m, "lpo_loss").unwrap_err();
        assert!(
            err.contains("unknown option `bta` (did you mean `beta`?)")
                && err.contains("accepted: beta, clip, k, mode, name"),
            "{err}"
        );
        let m = map(&[("k", Dynamic::from(2.5_f64))]);
        let err = from_map::<Opts>(&m, "f").unwrap_err();
        assert!(
            err.contains("option `k` must be an integer, got f64"),
            "{err}"
        );
        let m = map(&[("k", Dynamic::from(-1_i64))]);
        assert!(from_map::<Opts>(&m, "f").unwrap_err().contains(">= 0"));
        let m = map(&[("mode", Dynamic::from("linear"))]);
        let err = from_map::<Opts>(&m, "f").unwrap_err();
        assert!(
            err.contains("option `mode` must be one of: static, sigma"),
            "{err}"
        );
        let m = map(&[("beta", Dynamic::from(f64::NAN))]);
        assert!(from_map::<Opts>(&m, "f").unwrap_err().contains("finite"));
    }

    #[test]
    fn host_keys_pass_through() {
        let m = map(&[("rng", Dynamic::from(7_i64)), ("k", Dynamic::from(2_i64))]);
        let (o, host) = from_map_with::<Opts>(&m, "f", &["rng"]).unwrap();
        assert_eq!(o.k, 2);
        assert_eq!(host.get("rng").unwrap().as_int().unwrap(), 7);
        let err = from_map::<Opts>(&m, "f").unwrap_err();
        assert!(err.contains("`rng`"), "{err}");
    }

    #[test]
    fn docs_list_names_types_defaults_and_docs() {
        let docs = option_docs::<Opts>();
        let names: Vec<_> = docs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            ["beta", "clip", "k", "mode", "name"],
            "sorted by name"
        );
        assert_eq!(docs[0].kind, "float");
        assert_eq!(docs[0].default.as_deref(), Some("1.0"));
        assert_eq!(docs[0].doc, "KL weight.");
        assert_eq!(docs[2].kind, "int");
        assert_eq!(docs[3].kind, "\"static\" | \"sigma\"");
        assert_eq!(docs[3].default.as_deref(), Some("\"sigma\""));
        assert_eq!(docs[1].kind, "float|()");
        assert_eq!(docs[1].default, None);
    }

    #[test]
    fn results_become_maps() {
        let m = to_map(&Opts::default()).unwrap();
        assert_eq!(m.get("k").unwrap().as_int().unwrap(), 4);
        assert_eq!(m.get("beta").unwrap().as_float().unwrap(), 1.0);
        assert!(m.get("clip").unwrap().is_unit());
    }
}
