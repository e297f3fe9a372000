//! REPL commands: `:help`, `:fns`, `:vars`, `:load`, `:time`, `:reset`, `:quit`.

use std::time::Instant;

use super::completion::COMMANDS;
use super::{print_result, Session};
use crate::script::docs::{functions, FunctionDoc};

pub enum Outcome {
    Continue,
    Quit,
}

/// Every documented function: registered ones, then the session's own.
fn all_docs(session: &Session) -> Vec<FunctionDoc> {
    let meta = session
        .se
        .engine
        .gen_fn_metadata_to_json(false)
        .unwrap_or_default();
    let mut docs = functions(&meta);
    for f in session.functions.iter_functions() {
        docs.push(FunctionDoc {
            name: f.name.to_string(),
            signature: format!("{}({})", f.name, f.params.join(", ")),
            doc: f
                .comments
                .iter()
                .map(|c| c.trim_start_matches("///").trim().to_string())
                .collect::<Vec<_>>()
                .join("\n"),
            options: Vec::new(),
        });
    }
    for (path, alias) in &session.imports {
        if let Ok(list) = super::markdown::module_functions(&session.se.engine, &session.se, path) {
            docs.extend(list.into_iter().map(|mut d| {
                d.signature = d
                    .signature
                    .replacen(&format!("{path}::"), &format!("{alias}::"), 1);
                d.name = format!("{alias}::{}", d.name);
                d
            }));
        }
    }
    docs
}

/// The text of `:help NAME`.
pub fn help(session: &Session, name: &str) -> String {
    let name = name.trim();
    if name.is_empty() {
        let mut out = String::from("Commands:\n");
        for (_, line) in COMMANDS {
            out.push_str(&format!("  {line}\n"));
        }
        out.push_str("Anything else is Rhai; an unfinished statement continues on the next line (an empty line ends it).\nTab completes names; Ctrl-C cancels a running evaluation.");
        return out;
    }
    if let Some((_, line)) = COMMANDS
        .iter()
        .find(|(c, _)| *c == name || c.trim_start_matches(':') == name)
    {
        return line.to_string();
    }
    let docs = all_docs(session);
    let matching: Vec<&FunctionDoc> = docs.iter().filter(|d| d.name == name).collect();
    if matching.is_empty() {
        let similar: Vec<&str> = docs
            .iter()
            .filter(|d| d.name.contains(name) || name.contains(d.name.as_str()))
            .map(|d| d.name.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .take(10)
            .collect();
        return if similar.is_empty() {
            format!("no function `{name}` (:fns lists them)")
        } else {
            format!("no function `{name}`; similar: {}", similar.join(", "))
        };
    }
    let mut out = String::new();
    for d in matching {
        out.push_str(&d.to_text());
    }
    out.trim_end().to_string()
}

pub fn run(session: &mut Session, input: &str) -> Outcome {
    let (cmd, arg) = input.split_once(char::is_whitespace).unwrap_or((input, ""));
    let arg = arg.trim();
    match cmd {
        ":quit" | ":q" | ":exit" => return Outcome::Quit,
        ":help" | ":h" => println!("{}", help(session, arg)),
        ":fns" => {
            let mut seen = std::collections::BTreeSet::new();
            for d in all_docs(session) {
                if d.name.contains(arg) && !d.name.contains('$') && seen.insert(d.signature.clone())
                {
                    println!("{}", d.signature);
                }
            }
        }
        ":vars" => {
            let vars: Vec<(String, String, String)> = session
                .scope
                .iter()
                .map(|(name, _, v)| {
                    let mut shown = session.show(&v);
                    if shown.chars().count() > 100 {
                        shown = shown.chars().take(100).collect::<String>() + "...";
                    }
                    (name.to_string(), v.type_name().to_string(), shown)
                })
                .collect();
            for (name, ty, shown) in vars {
                println!("{name}: {ty} = {shown}");
            }
        }
        ":load" => {
            if arg.is_empty() {
                eprintln!("usage: :load FILE");
            } else {
                match std::fs::read_to_string(arg) {
                    Ok(text) => {
                        let result = session.eval(arg, &text);
                        print_result(session, result);
                    }
                    Err(e) => eprintln!("error: cannot read {arg}: {e}"),
                }
            }
        }
        ":time" => {
            if arg.is_empty() {
                eprintln!("usage: :time EXPR");
            } else {
                let start = Instant::now();
                let result = session.eval("<repl>", arg);
                let elapsed = start.elapsed();
                print_result(session, result);
                println!("time: {:.3} ms", elapsed.as_secs_f64() * 1e3);
            }
        }
        ":reset" => {
            session.reset();
            println!("session reset");
        }
        _ => eprintln!("unknown command `{cmd}` (:help lists them)"),
    }
    Outcome::Continue
}
