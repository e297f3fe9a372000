//! `lpo repl`: an interactive session with one persistent scope.
//!
//! Variables live in one [`Scope`]; functions defined at the prompt are kept in an AST merged
//! into every later input; `import "m" as a;` registers the module under `a` for the rest of
//! the session. Incomplete statements continue on the next line; Ctrl-C cancels a running
//! evaluation (the signal thread sets the run control) and clears the line at the prompt.

pub mod commands;
pub mod completion;
pub mod markdown;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rhai::{Dynamic, ModuleResolver, Position, Scope, AST};

use crate::run::report;
use crate::runtime::control::RunControl;
use crate::script::{build_engine, classify, EngineOptions, Failure, Host, ScriptEngine};
use completion::{Names, ReplHelper};

pub struct Session {
    pub se: ScriptEngine,
    pub scope: Scope<'static>,
    /// Functions defined so far (no statements).
    pub functions: AST,
    /// `(path, alias)` of every import so far.
    pub imports: Vec<(String, String)>,
    pub control: Arc<RunControl>,
    host: Host,
    /// Names of the registered functions and methods (completion), computed once.
    builtin: (Vec<String>, Vec<String>),
}

/// An input that failed: the report to print, and whether it was a Ctrl-C.
pub struct EvalError {
    pub report: String,
    pub interrupted: bool,
}

impl Session {
    pub fn new(host: Host) -> Session {
        // The host carries the tensor memory cap of `lpo repl --max-tensor-memory`.
        let options = EngineOptions {
            limits: crate::script::Limits {
                max_tensor_memory: host.max_tensor_bytes,
                ..Default::default()
            },
            ..EngineOptions::default()
        };
        let se = build_engine(host.clone(), &options);
        let builtin = builtin_names(&se);
        let mut s = Session {
            se,
            scope: Scope::new(),
            functions: AST::empty(),
            imports: Vec::new(),
            control: host.control.clone(),
            host,
            builtin,
        };
        s.scope.push_constant("params", rhai::Map::new());
        s
    }

    /// Forget every variable, function and import.
    pub fn reset(&mut self) {
        *self = Session::new(self.host.clone());
    }

    /// Evaluate `input` (named `name` in errors) into the session.
    pub fn eval(&mut self, name: &str, input: &str) -> Result<Dynamic, EvalError> {
        let mut ast = match self.se.engine.compile_with_scope(&self.scope, input) {
            Ok(ast) => ast,
            Err(e) => {
                return Err(EvalError {
                    report: report::format_at(name, input, e.position(), &e.err_type().to_string()),
                    interrupted: false,
                })
            }
        };
        ast.set_source(name.to_string());
        let merged = self.functions.merge(&ast);
        self.control.reset();
        let result = self
            .se
            .engine
            .eval_ast_with_scope::<Dynamic>(&mut self.scope, &merged);
        // Definitions and imports of the input stay, even when a later statement failed.
        self.functions = self.functions.merge(&ast.clone_functions_only());
        self.register_imports(name, input);
        match result {
            Ok(v) => Ok(v),
            Err(err) => {
                let failure = classify(&err, &self.control);
                let interrupted = matches!(failure, Failure::Stopped(_));
                self.control.reset();
                let report = if interrupted {
                    "interrupted".to_string()
                } else {
                    report::format_eval_error(name, input, &err)
                };
                Err(EvalError {
                    report,
                    interrupted,
                })
            }
        }
    }

    /// Register the modules that `input` imports under their alias, so later inputs see them.
    fn register_imports(&mut self, name: &str, input: &str) {
        let source = (name != "<repl>").then_some(name);
        for (path, alias) in find_imports(input) {
            let resolver = self.se.resolver.clone();
            if let Ok(module) = resolver.resolve(&self.se.engine, source, &path, Position::NONE) {
                self.se
                    .engine
                    .register_static_module(alias.as_str(), module);
                self.imports.retain(|(_, a)| a != &alias);
                self.imports.push((path, alias));
            }
        }
    }

    /// The value as the REPL shows it: `to_debug` (tensors: shape, dtype, stats, preview).
    pub fn show(&self, v: &Dynamic) -> String {
        if let Some(t) = v.clone().try_cast::<candle_core::Tensor>() {
            return crate::tensor::format::summary(&t);
        }
        let mut scope = Scope::new();
        scope.push("__v", v.clone());
        self.se
            .engine
            .eval_with_scope::<String>(&mut scope, "to_debug(__v)")
            .unwrap_or_else(|_| format!("{v:?}"))
    }

    /// Refresh what completion offers.
    pub fn names(&self) -> Names {
        let mut functions = self.builtin.0.clone();
        functions.extend(self.functions.iter_functions().map(|f| f.name.to_string()));
        let imported = self
            .imports
            .iter()
            .map(|(path, alias)| {
                let fns = markdown::module_functions(&self.se.engine, &self.se, path)
                    .map(|docs| docs.into_iter().map(|d| d.name).collect())
                    .unwrap_or_default();
                (alias.clone(), fns)
            })
            .collect();
        Names {
            functions,
            methods: self.builtin.1.clone(),
            variables: self.scope.iter().map(|(n, _, _)| n.to_string()).collect(),
            modules: self.se.resolver.module_names(),
            imported,
        }
    }
}

fn builtin_names(se: &ScriptEngine) -> (Vec<String>, Vec<String>) {
    let meta = se.engine.gen_fn_metadata_to_json(false).unwrap_or_default();
    let docs = crate::script::docs::functions(&meta);
    let mut functions = Vec::new();
    let mut methods = Vec::new();
    for d in docs {
        if let Some(prop) = d.name.strip_prefix("get$") {
            methods.push(prop.to_string());
            continue;
        }
        if d.name.contains('$') {
            continue;
        }
        if d.signature.contains(':') {
            methods.push(d.name.clone());
        }
        functions.push(d.name);
    }
    functions.sort();
    functions.dedup();
    methods.sort();
    methods.dedup();
    (functions, methods)
}

/// `import "path" as alias` statements of `text` (comments and strings elsewhere ignored).
pub fn find_imports(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("import") {
        let before_ok = i == 0
            || !rest[..i]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
        let after = &rest[i + "import".len()..];
        rest = after;
        if !before_ok {
            continue;
        }
        let after = after.trim_start();
        let Some(after) = after.strip_prefix('"') else {
            continue;
        };
        let Some(end) = after.find('"') else { continue };
        let path = &after[..end];
        let tail = after[end + 1..].trim_start();
        let Some(tail) = tail.strip_prefix("as") else {
            continue;
        };
        if !tail.starts_with(char::is_whitespace) {
            continue;
        }
        let alias: String = tail
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !alias.is_empty() {
            out.push((path.to_string(), alias));
        }
    }
    out
}

fn history_path() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("lpo").join("history.txt"))
}

pub fn run_repl(host: Host, control: Arc<RunControl>) -> i32 {
    let mut session = Session::new(host);
    let names = Arc::new(Mutex::new(session.names()));
    let config = rustyline::Config::builder()
        .auto_add_history(false)
        .completion_type(rustyline::CompletionType::List)
        .build();
    let mut editor: rustyline::Editor<ReplHelper, rustyline::history::FileHistory> =
        match rustyline::Editor::with_config(config) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("error: cannot start the line editor: {e}");
                return 1;
            }
        };
    editor.set_helper(Some(ReplHelper::new(names.clone())));
    // After the editor: rustyline replaces the SIGINT handler when it opens the terminal, and
    // Ctrl-C during an evaluation must reach the run control.
    if let Err(e) = crate::runtime::control::install_signal_handlers(control.clone()) {
        eprintln!("warning: cannot install signal handlers: {e}");
    }
    let history = history_path();
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = editor.load_history(h);
    }
    println!("lpo repl — Rhai with tensors. :help for commands, :quit to leave.");
    loop {
        match editor.readline("lpo> ") {
            Ok(line) => {
                let input = line.trim();
                if input.is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(input);
                if let Some(h) = &history {
                    let _ = editor.save_history(h);
                }
                if input.starts_with(':') {
                    match commands::run(&mut session, input) {
                        commands::Outcome::Quit => break,
                        commands::Outcome::Continue => {}
                    }
                } else {
                    let result = session.eval("<repl>", input);
                    print_result(&session, result);
                }
                *names.lock().unwrap_or_else(|e| e.into_inner()) = session.names();
            }
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("error: {e}");
                break;
            }
        }
    }
    0
}

pub fn print_result(session: &Session, result: Result<Dynamic, EvalError>) {
    match result {
        Ok(v) if v.is_unit() => {}
        Ok(v) => println!("{}", session.show(&v)),
        Err(e) if e.interrupted => println!("^C interrupted: the session goes on"),
        Err(e) => eprintln!("error: {}", e.report),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn finds_imports() {
        assert_eq!(
            find_imports("import \"util\" as u; let reimport = 1; import \"./x\" as x_1;"),
            vec![
                ("util".to_string(), "u".to_string()),
                ("./x".to_string(), "x_1".to_string())
            ]
        );
    }

    #[test]
    fn session_keeps_variables_functions_and_imports() {
        let mut s = Session::new(Host::new(RunControl::new(), Device::Cpu, 0));
        assert!(s
            .eval("<repl>", "let x = 20; fn twice(v) { v * 2 }")
            .is_ok());
        assert!(s.eval("<repl>", "import \"util\" as u;").is_ok());
        let v = s
            .eval("<repl>", "u::param(#{a: 1}, \"a\", 5) + twice(x)")
            .ok()
            .unwrap();
        assert_eq!(v.as_int().unwrap(), 41);
        let e = s.eval("<repl>", "let y = 1;\nnope(y)").err().unwrap();
        assert!(e.report.contains("<repl>:2:1"), "{}", e.report);
        assert_eq!(s.show(&Dynamic::from("a")), "\"a\"");
        s.reset();
        assert!(s.eval("<repl>", "x").is_err());
    }
}
