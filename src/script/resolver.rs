//! Module resolution for `import "name" as m;`:
//! `./x` and `../x` are relative to the importing script; a bare name is looked up in
//! `./stdlib/`, then beside the running script, then in the copy of `stdlib/` compiled into
//! the binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rhai::{Engine, EvalAltResult, Module, ModuleResolver, Position, Scope, Shared};
type SharedModule = Shared<Module>;

include!(concat!(env!("OUT_DIR"), "/embedded_stdlib.rs"));

pub struct StdlibResolver {
    stdlib_dir: PathBuf,
    script_dir: Option<PathBuf>,
    cache: Mutex<HashMap<String, SharedModule>>,
}

/// Where a module's source was found.
enum Found {
    File(PathBuf),
    Embedded(&'static str, &'static str),
}

impl StdlibResolver {
    pub fn new(stdlib_dir: PathBuf, script_dir: Option<PathBuf>) -> Self {
        Self {
            stdlib_dir,
            script_dir,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Names of every module importable by bare name (for completion and docs).
    pub fn module_names(&self) -> Vec<String> {
        let mut names: Vec<String> = EMBEDDED_STDLIB.iter().map(|(n, _)| n.to_string()).collect();
        if let Ok(entries) = std::fs::read_dir(&self.stdlib_dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "rhai") {
                    names.push(p.file_stem().unwrap().to_string_lossy().into_owned());
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    pub fn clear_cache(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn with_ext(path: &str) -> String {
        if path.ends_with(".rhai") {
            path.to_string()
        } else {
            format!("{path}.rhai")
        }
    }

    /// The text of the module `import "path"` finds from the running script, read without
    /// running it (for the parameter declaration `lpo run` reads up front).
    pub fn source_of(&self, path: &str) -> Result<String, String> {
        match self.locate(None, path) {
            Some(Found::File(p)) => std::fs::read_to_string(&p)
                .map_err(|e| format!("cannot read module {}: {e}", p.display())),
            Some(Found::Embedded(_, src)) => Ok(src.to_string()),
            None => Err(format!("no module `{path}`")),
        }
    }

    fn locate(&self, source: Option<&str>, path: &str) -> Option<Found> {
        let file = Self::with_ext(path);
        let relative = path.starts_with("./") || path.starts_with("../");
        if relative || Path::new(path).is_absolute() {
            let base = source
                .and_then(|s| Path::new(s).parent().map(Path::to_path_buf))
                .or_else(|| self.script_dir.clone())
                .unwrap_or_default();
            let candidate = base.join(&file);
            return candidate.is_file().then_some(Found::File(candidate));
        }
        let mut candidates = vec![self.stdlib_dir.join(&file)];
        if let Some(dir) = source.and_then(|s| Path::new(s).parent()) {
            candidates.push(dir.join(&file));
        }
        if let Some(dir) = &self.script_dir {
            candidates.push(dir.join(&file));
        }
        if let Some(found) = candidates.into_iter().find(|c| c.is_file()) {
            return Some(Found::File(found));
        }
        EMBEDDED_STDLIB
            .iter()
            .find(|(name, _)| *name == path.trim_end_matches(".rhai"))
            .map(|(name, src)| Found::Embedded(name, src))
    }
}

impl ModuleResolver for StdlibResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        let found = self
            .locate(source, path)
            .ok_or_else(|| EvalAltResult::ErrorModuleNotFound(path.to_string(), pos))?;
        let (key, name, text) = match found {
            Found::File(p) => {
                // A module file is read like any other: through the host's gate.
                if let Some(host) = engine.default_tag().clone().try_cast::<super::Host>() {
                    host.files
                        .check_read(&p)
                        .map_err(|e| super::error::error_at(pos, e))?;
                }
                let text = std::fs::read_to_string(&p).map_err(|e| -> Box<EvalAltResult> {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        // Not UTF-8: a parse error of that module, as for the script itself.
                        let lex = rhai::LexError::Runtime(
                            "not UTF-8 text; a script must be UTF-8".into(),
                        );
                        let parse = EvalAltResult::ErrorParsing(
                            rhai::ParseErrorType::BadInput(lex),
                            Position::NONE,
                        );
                        return EvalAltResult::ErrorInModule(
                            p.display().to_string(),
                            parse.into(),
                            pos,
                        )
                        .into();
                    }
                    EvalAltResult::ErrorSystem(
                        format!("cannot read module {}", p.display()),
                        e.into(),
                    )
                    .into()
                })?;
                (p.display().to_string(), p.display().to_string(), text)
            }
            Found::Embedded(name, src) => (
                format!("<stdlib>/{name}.rhai"),
                format!("<stdlib>/{name}.rhai"),
                src.to_string(),
            ),
        };
        if let Some(m) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(m.clone());
        }
        let mut ast = engine
            .compile(&text)
            .map_err(|e| EvalAltResult::ErrorInModule(name.clone(), Box::new(e.into()), pos))?;
        ast.set_source(name.clone());
        let module = Module::eval_ast_as_new(Scope::new(), &ast, engine)
            .map_err(|e| EvalAltResult::ErrorInModule(name.clone(), e, pos))?;
        let shared: SharedModule = Arc::new(module);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, shared.clone());
        Ok(shared)
    }
}
