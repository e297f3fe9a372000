//! Declared script parameters. A recipe lists what it takes once, as a literal map, and checks
//! its `params` against it:
//!
//! ```text
//! const PARAMS = #{
//!     epochs: #{value: 5, min: 1, doc: "training epochs"},
//!     max_grad_norm: #{value: (), type: "float", doc: "global-norm clipping; () = off"},
//! };
//! let p = check_params(PARAMS, params);
//! ```
//!
//! Each entry holds the default `value` (`default` is a reserved word in Rhai) and `doc`, and may
//! add `type` (else the default value's), `min` / `max`
//! (inclusive, numbers) and `choices`. `lpo run` reads the same literal from the compiled script,
//! so a wrong `--set` stops with exit 2 before the run starts, and `lpo run SCRIPT --help` lists
//! the parameters without running anything.
//!
//! Recipes that share a module's parameters declare them once, in the module, and extend them:
//!
//! ```text
//! import "lpo_recipe" as recipe;
//! const PARAMS_FROM = "lpo_recipe";          // the module's `export const PARAMS`
//! const PARAMS = #{lr: #{value: 1e-5, doc: "learning rate"}};   // replaces the module's entry
//! let p = check_params(recipe::PARAMS + PARAMS, params);
//! ```

use rhai::{Dynamic, Map};

use super::convert::dynamic_f64;
use super::suggest::did_you_mean;

/// The name of the declaration constant in a script.
pub const DECLARATION: &str = "PARAMS";

/// The name of the constant that names a module whose declaration a script's extends
/// (`const PARAMS_FROM = "lpo_recipe";`, see [`Declaration::of_script_with`]).
pub const BASE: &str = "PARAMS_FROM";

/// Keys the host sets itself (`resume` on every `lpo run`): accepted whether declared or not.
pub const HOST_KEYS: &[&str] = &["resume"];

const ENTRY_KEYS: &[&str] = &["value", "doc", "type", "min", "max", "choices"];

/// A value type a parameter accepts. `Named` is a script object type (`Vae`, `Scheduler`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Int,
    /// A float; ints are accepted too.
    Float,
    Bool,
    Str,
    /// A string that names a file or folder.
    Path,
    Array,
    Map,
    Unit,
    Any,
    Named(String),
}

impl Kind {
    fn parse(name: &str) -> Kind {
        match name {
            "int" => Kind::Int,
            "float" => Kind::Float,
            "bool" => Kind::Bool,
            "string" => Kind::Str,
            "path" => Kind::Path,
            "array" => Kind::Array,
            "map" => Kind::Map,
            "()" => Kind::Unit,
            "any" => Kind::Any,
            other => Kind::Named(other.to_string()),
        }
    }

    /// The kind of a default value; None for `()`, which says nothing about the type.
    fn of(value: &Dynamic, type_of: &dyn Fn(&Dynamic) -> String) -> Option<Kind> {
        let kind = if value.is_unit() {
            return None;
        } else if value.is_int() {
            Kind::Int
        } else if value.is_float() {
            Kind::Float
        } else if value.is_bool() {
            Kind::Bool
        } else if value.is_string() {
            Kind::Str
        } else if value.is_array() {
            Kind::Array
        } else if value.is_map() {
            Kind::Map
        } else {
            Kind::Named(type_of(value))
        };
        Some(kind)
    }

    fn name(&self) -> &str {
        match self {
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Bool => "bool",
            Kind::Str => "string",
            Kind::Path => "path",
            Kind::Array => "array",
            Kind::Map => "map",
            Kind::Unit => "()",
            Kind::Any => "any",
            Kind::Named(n) => n,
        }
    }

    fn accepts(&self, value: &Dynamic, type_of: &dyn Fn(&Dynamic) -> String) -> bool {
        match self {
            Kind::Int => value.is_int(),
            Kind::Float => value.is_float() || value.is_int(),
            Kind::Bool => value.is_bool(),
            Kind::Str | Kind::Path => value.is_string(),
            Kind::Array => value.is_array(),
            Kind::Map => value.is_map(),
            Kind::Unit => value.is_unit(),
            Kind::Any => true,
            Kind::Named(n) => type_of(value) == *n,
        }
    }

    /// The value of command-line text as this kind, if it reads as one.
    fn read(&self, text: &str) -> Option<Dynamic> {
        match self {
            Kind::Int => text.parse::<i64>().ok().map(Dynamic::from),
            // An int stays an int, as the script would have written it.
            Kind::Float => text.parse::<i64>().map(Dynamic::from).ok().or_else(|| {
                text.parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .map(Dynamic::from)
            }),
            Kind::Bool => match text {
                "true" => Some(Dynamic::TRUE),
                "false" => Some(Dynamic::FALSE),
                _ => None,
            },
            Kind::Array | Kind::Map => serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| rhai::serde::to_dynamic(v).ok())
                .filter(|v| self.accepts(v, &|v| v.type_name().to_string())),
            Kind::Str | Kind::Path => Some(Dynamic::from(text.to_string())),
            Kind::Unit => (text == "()").then_some(Dynamic::UNIT),
            Kind::Any => Some(typed_value(text)),
            Kind::Named(_) => None,
        }
    }
}

/// Command-line text as the value it reads as: int, float, bool, `()`, else a string (how an
/// undeclared `--set` value is typed).
pub fn typed_value(value: &str) -> Dynamic {
    if let Ok(i) = value.parse::<i64>() {
        Dynamic::from(i)
    } else if let Ok(f) = value.parse::<f64>() {
        Dynamic::from(f)
    } else if value == "true" || value == "false" {
        Dynamic::from(value == "true")
    } else if value == "()" {
        Dynamic::UNIT
    } else {
        Dynamic::from(value.to_string())
    }
}

/// One declared parameter.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub default: Dynamic,
    pub doc: String,
    kinds: Vec<Kind>,
    min: Option<f64>,
    max: Option<f64>,
    choices: Vec<Dynamic>,
}

impl ParamSpec {
    fn from_entry(
        name: &str,
        entry: &Dynamic,
        type_of: &dyn Fn(&Dynamic) -> String,
    ) -> Result<Self, String> {
        let at = format!("{DECLARATION}.{name}");
        let entry = entry.read_lock::<Map>().ok_or_else(|| {
            format!("{at}: expected a map #{{value: ..., doc: \"...\"}}, got {entry}")
        })?;
        if let Some(bad) = entry.keys().find(|k| !ENTRY_KEYS.contains(&k.as_str())) {
            return Err(format!(
                "{at}: unknown field `{bad}`; accepted: {}",
                ENTRY_KEYS.join(", ")
            ));
        }
        let default = entry
            .get("value")
            .cloned()
            .ok_or_else(|| format!("{at}: no default `value` (write `value: ()` for none)"))?;
        let doc = entry
            .get("doc")
            .and_then(|d| d.clone().into_string().ok())
            .ok_or_else(|| format!("{at}: no `doc` string"))?;
        let mut kinds: Vec<Kind> = match entry.get("type") {
            Some(t) => {
                let t = t
                    .clone()
                    .into_string()
                    .map_err(|_| format!("{at}: `type` must be a string such as \"float|()\""))?;
                t.split('|').map(|k| Kind::parse(k.trim())).collect()
            }
            None => match Kind::of(&default, type_of) {
                Some(kind) => vec![kind],
                None => {
                    return Err(format!(
                        "{at}: a `()` default needs a `type` (e.g. \"float\" or \"path\")"
                    ))
                }
            },
        };
        if default.is_unit() && !kinds.contains(&Kind::Unit) {
            kinds.push(Kind::Unit);
        }
        let bound = |key: &str| -> Result<Option<f64>, String> {
            match entry.get(key) {
                None => Ok(None),
                Some(v) => dynamic_f64(v)
                    .map(Some)
                    .ok_or_else(|| format!("{at}: `{key}` must be a number, got {v}")),
            }
        };
        let choices = match entry.get("choices") {
            None => Vec::new(),
            Some(c) => c
                .clone()
                .into_array()
                .map_err(|_| format!("{at}: `choices` must be an array"))?,
        };
        let spec = ParamSpec {
            name: name.to_string(),
            min: bound("min")?,
            max: bound("max")?,
            default,
            doc,
            kinds,
            choices,
        };
        spec.check(&spec.default, type_of)
            .map_err(|e| format!("{at}: the default does not pass its own check: {e}"))?;
        Ok(spec)
    }

    /// `int`, `float|()`, ... with the range and choices, for messages and `--help`.
    pub fn type_text(&self) -> String {
        if !self.choices.is_empty() {
            let choices: Vec<String> = self.choices.iter().map(show).collect();
            return format!("one of {}", choices.join(", "));
        }
        let mut text = self
            .kinds
            .iter()
            .map(Kind::name)
            .collect::<Vec<_>>()
            .join("|");
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => text.push_str(&format!(" in {lo}..={hi}")),
            (Some(lo), None) => text.push_str(&format!(" >= {lo}")),
            (None, Some(hi)) => text.push_str(&format!(" <= {hi}")),
            (None, None) => {}
        }
        text
    }

    /// Command-line text (`--set NAME=TEXT`) as a value of this parameter's type, checked.
    pub fn read_text(&self, text: &str) -> Result<Dynamic, String> {
        // `()` first: a nullable string parameter reads "()" as none, as undeclared ones do.
        let order = [
            Kind::Unit,
            Kind::Int,
            Kind::Float,
            Kind::Bool,
            Kind::Array,
            Kind::Map,
            Kind::Str,
            Kind::Path,
            Kind::Any,
        ];
        let named = self.kinds.iter().filter(|k| matches!(k, Kind::Named(_)));
        let value = order
            .iter()
            .filter(|k| self.kinds.contains(k))
            .chain(named)
            .find_map(|k| k.read(text))
            .ok_or_else(|| format!("`{}` takes {}, got `{text}`", self.name, self.type_text()))?;
        self.check(&value, &|v| v.type_name().to_string())?;
        Ok(value)
    }

    /// Type, range and choices of `value`.
    pub fn check(
        &self,
        value: &Dynamic,
        type_of: &dyn Fn(&Dynamic) -> String,
    ) -> Result<(), String> {
        let name = &self.name;
        if !self.kinds.iter().any(|k| k.accepts(value, type_of)) {
            return Err(format!(
                "`{name}` takes {}, got {} {}",
                self.type_text(),
                type_of(value),
                show(value)
            ));
        }
        if value.is_unit() {
            return Ok(());
        }
        if let Some(x) = dynamic_f64(value) {
            let below = self.min.is_some_and(|lo| x < lo);
            let above = self.max.is_some_and(|hi| x > hi);
            if below || above {
                return Err(format!(
                    "`{name}` must be {}, got {}",
                    self.type_text(),
                    show(value)
                ));
            }
        }
        if !self.choices.is_empty() && !self.choices.iter().any(|c| same(c, value)) {
            return Err(format!(
                "`{name}` must be one of {}, got {}",
                self.choices.iter().map(show).collect::<Vec<_>>().join(", "),
                show(value)
            ));
        }
        Ok(())
    }
}

/// A value as a script would write it (strings quoted).
fn show(value: &Dynamic) -> String {
    if value.is_string() {
        format!("{:?}", value.to_string())
    } else if value.is_unit() {
        "()".to_string()
    } else if let Ok(f) = value.as_float() {
        format!("{f:?}")
    } else {
        value.to_string()
    }
}

fn same(a: &Dynamic, b: &Dynamic) -> bool {
    a.type_name() == b.type_name() && a.to_string() == b.to_string()
}

/// A script's parameter declaration, in name order.
#[derive(Debug, Clone)]
pub struct Declaration {
    pub params: Vec<ParamSpec>,
}

impl Declaration {
    /// Read a declaration map (`PARAMS`); `type_of` names script object types.
    pub fn from_map(map: &Map, type_of: &dyn Fn(&Dynamic) -> String) -> Result<Self, String> {
        let params = map
            .iter()
            .map(|(name, entry)| ParamSpec::from_entry(name, entry, type_of))
            .collect::<Result<_, _>>()?;
        Ok(Declaration { params })
    }

    /// The declaration of a script: its top-level `const PARAMS`, which must be a literal map.
    /// None when the script declares nothing. Parsed without optimization, which would drop
    /// a constant nothing uses.
    pub fn of_script(source: &str) -> Result<Option<Self>, String> {
        Self::of_script_with(source, &|name| {
            Err(format!("module `{name}` is not readable here"))
        })
    }

    /// `of_script` for a script that may extend a module's declaration: with a literal
    /// `const PARAMS_FROM = "module"` (a module that declares `export const PARAMS`, its source
    /// from `module_source`), the module's entries come first and the script's own replace
    /// those of the same name, as `module::PARAMS + PARAMS` does when the script runs.
    pub fn of_script_with(
        source: &str,
        module_source: &dyn Fn(&str) -> Result<String, String>,
    ) -> Result<Option<Self>, String> {
        let (own, base) = literal_declaration(source, true)?;
        let merged = match base {
            None => own,
            Some(module) => {
                let text = module_source(&module).map_err(|e| format!("`const {BASE}`: {e}"))?;
                let (inherited, _) = literal_declaration(&text, false)
                    .map_err(|e| format!("module `{module}`: {e}"))?;
                let mut merged = inherited.ok_or_else(|| {
                    format!("`const {BASE}`: module `{module}` declares no `const {DECLARATION}`")
                })?;
                merged.extend(own.unwrap_or_default());
                Some(merged)
            }
        };
        merged
            .map(|m| Self::from_map(&m, &|v| v.type_name().to_string()))
            .transpose()
    }

    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// "unknown parameter `x`", with the closest declared names.
    pub fn unknown(&self, key: &str) -> String {
        format!(
            "unknown parameter `{key}`{}",
            did_you_mean(key, &self.names())
        )
    }

    /// Every problem of `values`: unknown keys, wrong types, out of range.
    pub fn problems(&self, values: &Map, type_of: &dyn Fn(&Dynamic) -> String) -> Vec<String> {
        values
            .iter()
            .filter_map(|(key, value)| match self.get(key) {
                Some(spec) => spec.check(value, type_of).err(),
                None if HOST_KEYS.contains(&key.as_str()) => None,
                None => Some(self.unknown(key)),
            })
            .collect()
    }

    /// `values` over the defaults (call after `problems` found none).
    pub fn with_defaults(&self, values: &Map) -> Map {
        let mut merged: Map = self
            .params
            .iter()
            .map(|p| (p.name.as_str().into(), p.default.clone()))
            .collect();
        for (k, v) in values {
            merged.insert(k.clone(), v.clone());
        }
        merged
    }

    /// The parameter table of `lpo run SCRIPT --help`: name, type and range, default, doc.
    pub fn help(&self) -> String {
        let rows: Vec<(String, String, String)> = self
            .params
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    format!("{} = {}", p.type_text(), show(&p.default)),
                    p.doc.clone(),
                )
            })
            .collect();
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let mut text = String::new();
        for (name, ty, doc) in rows {
            text.push_str(&format!("  {name:<width$}  {ty}\n"));
            for line in doc.lines() {
                text.push_str(&format!("  {:<width$}      {line}\n", ""));
            }
        }
        text
    }
}

/// The literal `const PARAMS` map and (with `with_base`) `const PARAMS_FROM` module name of a
/// script, each None when absent; an error when one is declared but not a top-level literal.
fn literal_declaration(
    source: &str,
    with_base: bool,
) -> Result<(Option<Map>, Option<String>), String> {
    let mut engine = rhai::Engine::new_raw();
    engine.set_optimization_level(rhai::OptimizationLevel::None);
    let ast = engine.compile(source).map_err(|e| e.to_string())?;
    let literal = |wanted: &str| {
        ast.iter_literal_variables(true, false)
            .find(|(name, ..)| *name == wanted)
            .map(|(.., value)| value)
    };
    let params = match literal(DECLARATION) {
        Some(value) => Some(value.read_lock::<Map>().map(|m| m.clone()).ok_or_else(|| {
            format!("`const {DECLARATION}` must be a map of parameters, got {value}")
        })?),
        None if declares(source, DECLARATION) => {
            return Err(format!(
                "`const {DECLARATION}` must be a top-level map of literals (no variables or calls: \
                 a default computed from others is `()` with the rule in its doc)"
            ))
        }
        None => None,
    };
    if !with_base {
        return Ok((params, None));
    }
    let base = match literal(BASE) {
        Some(value) => Some(
            value
                .into_string()
                .map_err(|v| format!("`const {BASE}` must be the name of a module, got {v}"))?,
        ),
        None if declares(source, BASE) => {
            return Err(format!(
                "`const {BASE}` must be a top-level string literal (a module name)"
            ))
        }
        None => None,
    };
    Ok((params, base))
}

/// Whether `source` has a `const NAME` anywhere (to tell a declaration that is not a top-level
/// literal from none).
fn declares(source: &str, constant: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    source.match_indices("const").any(|(at, _)| {
        let before = source[..at].chars().next_back();
        let rest = &source[at + "const".len()..];
        let name = rest.trim_start();
        before.is_none_or(|c| !ident(c))
            && name.len() < rest.len()
            && name
                .strip_prefix(constant)
                .is_some_and(|after| !after.starts_with(ident))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declaration(script: &str) -> Declaration {
        Declaration::of_script(script).unwrap().unwrap()
    }

    fn type_name(v: &Dynamic) -> String {
        v.type_name().to_string()
    }

    const SCRIPT: &str = r#"
        const PARAMS = #{
            epochs: #{value: 5, min: 1, doc: "epochs"},
            lr: #{value: 1e-5, doc: "learning rate"},
            beta: #{value: 500, type: "float", doc: "beta"},
            clip: #{value: (), type: "float", doc: "clip"},
            mode: #{value: "sigma", choices: ["sigma", "static"], doc: "mode"},
            out: #{value: (), type: "path", doc: "out"},
            save: #{value: true, doc: "save"},
            steps: #{value: [1, 2], doc: "steps"},
            halt: #{value: -1, doc: "halt"},
        };
        let p = PARAMS;
    "#;

    #[test]
    fn text_is_read_as_the_declared_type() {
        let d = declaration(SCRIPT);
        let read = |k: &str, t: &str| d.get(k).unwrap().read_text(t);
        assert_eq!(read("epochs", "3").unwrap().as_int().unwrap(), 3);
        assert!(read("epochs", "abc").unwrap_err().contains("takes int"));
        assert!(read("epochs", "2.5").is_err());
        assert!(read("epochs", "0").unwrap_err().contains(">= 1"));
        assert_eq!(read("beta", "250").unwrap().as_int().unwrap(), 250);
        assert_eq!(read("lr", "1e-4").unwrap().as_float().unwrap(), 1e-4);
        assert!(read("lr", "nan").is_err());
        assert!(read("clip", "()").unwrap().is_unit());
        assert_eq!(read("clip", "1").unwrap().as_int().unwrap(), 1);
        assert!(read("mode", "linear").unwrap_err().contains("one of"));
        // a path keeps its text exactly, even when it reads as a number
        assert_eq!(read("out", "007").unwrap().into_string().unwrap(), "007");
        assert!(read("save", "yes").is_err());
        assert_eq!(
            read("steps", "[3, 4]").unwrap().into_array().unwrap().len(),
            2
        );
        assert_eq!(read("halt", "-1").unwrap().as_int().unwrap(), -1);
    }

    #[test]
    fn unknown_keys_suggest_the_closest_name_and_defaults_fill_in() {
        let d = declaration(SCRIPT);
        let mut values = Map::new();
        values.insert("epoch".into(), Dynamic::from(5_i64));
        values.insert("resume".into(), Dynamic::TRUE);
        let problems = d.problems(&values, &type_name);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("did you mean `epochs`"),
            "{problems:?}"
        );
        let mut ok = Map::new();
        ok.insert("epochs".into(), Dynamic::from(7_i64));
        let merged = d.with_defaults(&ok);
        assert_eq!(merged["epochs"].as_int().unwrap(), 7);
        assert_eq!(merged["beta"].as_int().unwrap(), 500);
        assert!(merged["clip"].is_unit());
    }

    #[test]
    fn a_declaration_extends_a_modules() {
        let module = r#"
            export const PARAMS = #{
                lr: #{value: 1e-5, doc: "learning rate"},
                epochs: #{value: 5, min: 1, doc: "epochs"},
            };
            fn f() { 1 }
        "#;
        let source = |name: &str| match name {
            "m" => Ok(module.to_string()),
            other => Err(format!("no module `{other}`")),
        };
        let script = r#"
            import "m" as m;
            const PARAMS_FROM = "m";
            const PARAMS = #{lr: #{value: 1e-3, doc: "a larger rate"}, extra: #{value: true, doc: "x"}};
            let p = check_params(m::PARAMS + PARAMS, params);
        "#;
        let d = Declaration::of_script_with(script, &source)
            .unwrap()
            .unwrap();
        assert_eq!(d.names(), ["epochs", "extra", "lr"]);
        assert_eq!(d.get("lr").unwrap().default.as_float().unwrap(), 1e-3);
        assert_eq!(d.get("epochs").unwrap().default.as_int().unwrap(), 5);
        // The module's declaration alone.
        let only = "const PARAMS_FROM = \"m\"; let p = 1;";
        let d = Declaration::of_script_with(only, &source).unwrap().unwrap();
        assert_eq!(d.names(), ["epochs", "lr"]);
        let err = |s: &str| Declaration::of_script_with(s, &source).unwrap_err();
        assert!(err("const PARAMS_FROM = \"nope\";").contains("no module `nope`"));
        assert!(err("const PARAMS_FROM = 3;").contains("name of a module"));
        assert!(err("let x = \"m\"; const PARAMS_FROM = x;").contains("string literal"));
        let empty = |_: &str| Ok("fn f() { 1 }".to_string());
        assert!(
            Declaration::of_script_with("const PARAMS_FROM = \"e\";", &empty)
                .unwrap_err()
                .contains("declares no `const PARAMS`")
        );
    }

    #[test]
    fn bad_declarations_are_named() {
        let err = |s: &str| Declaration::of_script(s).unwrap_err();
        assert!(
            err("const PARAMS = #{a: #{value: (), doc: \"x\"}}; let q = PARAMS;")
                .contains("PARAMS.a: a `()` default needs a `type`")
        );
        assert!(err("const PARAMS = #{a: #{value: 1}}; let q = PARAMS;").contains("no `doc`"));
        assert!(
            err("const PARAMS = #{a: #{value: 0, min: 1, doc: \"\"}}; let q = PARAMS;")
                .contains("does not pass")
        );
        assert!(
            err("const PARAMS = #{a: #{value: 1, doc: \"\", mn: 1}}; let q = PARAMS;")
                .contains("unknown field `mn`")
        );
        assert!(
            err("let x = 1; const PARAMS = #{a: #{value: x, doc: \"\"}}; let q = PARAMS;")
                .contains("literals")
        );
        assert!(Declaration::of_script("let q = 1; // const PARAMSX")
            .unwrap()
            .is_none());
        // An unused declaration is still read.
        assert!(
            Declaration::of_script("const PARAMS = #{a: #{value: 1, doc: \"\"}};")
                .unwrap()
                .is_some()
        );
    }
}
