//! `lpo repl`: an interactive session with one persistent scope.

use std::sync::Arc;

use rhai::{Dynamic, Scope};

use crate::control::RunControl;
use crate::script::{build_engine, EngineOptions, Host};

pub fn run_repl(host: Host, control: Arc<RunControl>) -> i32 {
    crate::control::REPL_MODE.store(true, std::sync::atomic::Ordering::SeqCst);
    let se = build_engine(host, &EngineOptions::default());
    let mut scope = Scope::new();
    scope.push_constant("params", rhai::Map::new());
    let mut editor = match rustyline::DefaultEditor::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot start the line editor: {e}");
            return 1;
        }
    };
    println!("lpo repl — Rhai with tensors. :quit to leave.");
    loop {
        match editor.readline("lpo> ") {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(line);
                if line == ":quit" || line == ":q" {
                    break;
                }
                control.reset();
                match se.engine.eval_with_scope::<Dynamic>(&mut scope, line) {
                    Ok(v) if v.is_unit() => {}
                    Ok(v) => println!("{}", show(&v)),
                    Err(e) => eprintln!("error: {e}"),
                }
            }
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(_) => break,
        }
    }
    0
}

fn show(v: &Dynamic) -> String {
    if let Some(t) = v.clone().try_cast::<candle_core::Tensor>() {
        return crate::tensor::format::summary(&t);
    }
    format!("{v:?}")
}
