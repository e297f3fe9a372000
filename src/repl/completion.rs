//! The line editor's helper: tab completion and multi-line input.

use std::sync::{Arc, Mutex};

use rhai::{Engine, ParseErrorType, Position};
use rustyline::completion::{Completer, Pair};
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::Context;

/// REPL commands with their one-line help.
pub const COMMANDS: &[(&str, &str)] = &[
    (
        ":help",
        ":help [NAME]   signature and doc of a function (or this list)",
    ),
    (
        ":fns",
        ":fns [FILTER]   functions whose name contains FILTER",
    ),
    (":vars", ":vars           variables of the session"),
    (":load", ":load FILE      run a script into the session"),
    (
        ":time",
        ":time EXPR      evaluate EXPR and print how long it took",
    ),
    (
        ":reset",
        ":reset          forget every variable, function and import",
    ),
    (":quit", ":quit           leave (also :q, Ctrl-D)"),
];

const KEYWORDS: &[&str] = &[
    "let", "const", "fn", "if", "else", "while", "loop", "for", "in", "break", "continue",
    "return", "throw", "try", "catch", "import", "export", "as", "true", "false", "switch", "do",
    "until", "private", "this", "params",
];

/// What completion knows about the session; the REPL refreshes it after each input.
#[derive(Default, Clone)]
pub struct Names {
    /// Registered and session-defined functions.
    pub functions: Vec<String>,
    /// Functions callable as methods (`x.name()`), and properties.
    pub methods: Vec<String>,
    pub variables: Vec<String>,
    /// Stdlib modules importable by name.
    pub modules: Vec<String>,
    /// Imported modules: alias and function names.
    pub imported: Vec<(String, Vec<String>)>,
}

pub struct ReplHelper {
    pub names: Arc<Mutex<Names>>,
    parser: Engine,
}

impl ReplHelper {
    pub fn new(names: Arc<Mutex<Names>>) -> Self {
        let mut parser = Engine::new_raw();
        parser.set_max_expr_depths(0, 0);
        Self { names, parser }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == ':'
}

/// The candidates for the word ending at `pos` in `line`: (start of the word, candidates).
pub fn candidates(names: &Names, line: &str, pos: usize) -> (usize, Vec<String>) {
    let before = &line[..pos];
    let start = before
        .char_indices()
        .rev()
        .take_while(|(_, c)| is_word_char(*c))
        .last()
        .map_or(pos, |(i, _)| i);
    let word = &before[start..];
    let head = &before[..start];
    let mut out: Vec<String> = Vec::new();
    let trimmed = line.trim_start();
    if trimmed.starts_with(':') && !head.trim_start().contains(' ') && head.trim().is_empty() {
        // A REPL command.
        out.extend(COMMANDS.iter().map(|(c, _)| c.to_string()));
    } else if trimmed.starts_with(":help ") || trimmed.starts_with(":fns ") {
        out.extend(names.functions.iter().cloned());
        out.extend(COMMANDS.iter().map(|(c, _)| c.to_string()));
    } else if head.trim_end().ends_with("import \"") || head.ends_with("import \"") {
        out.extend(names.modules.iter().cloned());
    } else if head.ends_with('.') {
        out.extend(names.methods.iter().cloned());
    } else if let Some((alias, _)) = word.split_once("::") {
        if let Some((_, fns)) = names.imported.iter().find(|(a, _)| a == alias) {
            out.extend(fns.iter().map(|f| format!("{alias}::{f}")));
        }
    } else {
        out.extend(names.variables.iter().cloned());
        out.extend(names.functions.iter().cloned());
        out.extend(names.imported.iter().map(|(a, _)| format!("{a}::")));
        out.extend(KEYWORDS.iter().map(|k| k.to_string()));
    }
    out.retain(|c| c.starts_with(word) && !c.is_empty());
    out.sort();
    out.dedup();
    (start, out)
}

impl Completer for ReplHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let (start, list) = candidates(&names, line, pos);
        Ok((
            start,
            list.into_iter()
                .map(|c| Pair {
                    display: c.clone(),
                    replacement: c,
                })
                .collect(),
        ))
    }
}

/// Open brackets minus closed ones, outside strings and comments.
fn bracket_depth(text: &str) -> i64 {
    let mut depth = 0i64;
    let mut chars = text.chars().peekable();
    let mut in_str: Option<char> = None;
    while let Some(c) = chars.next() {
        if let Some(q) = in_str {
            if c == '\\' {
                chars.next();
            } else if c == q {
                in_str = None;
            }
            continue;
        }
        match c {
            '"' | '`' => in_str = Some(c),
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
    }
    depth
}

fn at_end(pos: Position, text: &str) -> bool {
    let Some(line) = pos.line() else { return true };
    let lines: Vec<&str> = text.trim_end().lines().collect();
    if line > lines.len() {
        return true;
    }
    line == lines.len() && pos.position().unwrap_or(0) > lines[line - 1].trim_end().len()
}

/// True when `input` is an unfinished statement that more lines could complete.
pub fn is_incomplete(parser: &Engine, input: &str) -> bool {
    let trimmed = input.trim_start();
    if trimmed.is_empty() || trimmed.starts_with(':') {
        return false;
    }
    match parser.compile(input) {
        Ok(_) => false,
        Err(e) => {
            matches!(e.err_type(), ParseErrorType::UnexpectedEOF)
                || bracket_depth(input) > 0
                || (at_end(e.position(), input)
                    && !matches!(
                        e.err_type(),
                        ParseErrorType::BadInput(_) | ParseErrorType::UnknownOperator(_)
                    ))
        }
    }
}

impl Validator for ReplHelper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        let input = ctx.input();
        // An empty line ends a multi-line input whatever it holds (its error is then shown).
        if input.contains('\n') && input.ends_with('\n') {
            return Ok(ValidationResult::Valid(None));
        }
        if is_incomplete(&self.parser, input) {
            Ok(ValidationResult::Incomplete)
        } else {
            Ok(ValidationResult::Valid(None))
        }
    }
}

impl rustyline::hint::Hinter for ReplHelper {
    type Hint = String;
}
impl rustyline::highlight::Highlighter for ReplHelper {}
impl rustyline::Helper for ReplHelper {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_inputs_wait_for_more() {
        let h = ReplHelper::new(Default::default());
        for text in [
            "fn f(x) {",
            "let x = 1 +",
            "let a = [1, 2,",
            "if true {\n  1",
            "foo(1,",
        ] {
            assert!(
                is_incomplete(&h.parser, text),
                "{text:?} should be incomplete"
            );
        }
        for text in [
            "let x = 1;",
            "fn f(x) { x }",
            "1 + 2",
            ":help",
            "let x = ;",
            "1 +* 2",
            "}",
        ] {
            assert!(
                !is_incomplete(&h.parser, text),
                "{text:?} should be complete (or an error)"
            );
        }
    }

    #[test]
    fn completes_functions_commands_modules_and_methods() {
        let names = Names {
            functions: vec!["randn".into(), "rng".into(), "checkpoint_save".into()],
            methods: vec!["matmul".into(), "mean".into()],
            variables: vec!["ranks".into()],
            modules: vec!["util".into()],
            imported: vec![("u".into(), vec!["param".into()])],
        };
        assert_eq!(
            candidates(&names, "let y = ra", 10).1,
            vec!["randn", "ranks"]
        );
        assert_eq!(candidates(&names, ":he", 3).1, vec![":help"]);
        assert_eq!(
            candidates(&names, "import \"ut", 10),
            (8, vec!["util".to_string()])
        );
        assert_eq!(candidates(&names, "x.ma", 4).1, vec!["matmul"]);
        assert_eq!(candidates(&names, "u::pa", 5).1, vec!["u::param"]);
        assert_eq!(
            candidates(&names, ":help check", 11).1,
            vec!["checkpoint_save"]
        );
    }
}
