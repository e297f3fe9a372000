//! Error reports a person can act on: file:line:col, the source line and a caret.

use rhai::{Engine, EvalAltResult, ParseError, Position};

/// `file:line:col: message` plus the offending source line with a caret under the column.
pub fn format_at(file: &str, source: &str, pos: Position, message: &str) -> String {
    let (Some(line), col) = (pos.line(), pos.position()) else {
        return format!("{file}: {message}");
    };
    let col = col.unwrap_or(1);
    let text = source.lines().nth(line - 1).unwrap_or("");
    let gutter = format!("{line}");
    format!(
        "{file}:{line}:{col}: {message}\n{pad} |\n{gutter} | {text}\n{pad} | {caret}^",
        pad = " ".repeat(gutter.len()),
        caret = " ".repeat(col.saturating_sub(1)),
    )
}

pub fn print_parse_error(file: &str, source: &str, err: &ParseError) {
    eprintln!(
        "error: {}",
        format_at(file, source, err.position(), &err.err_type().to_string())
    );
}

/// The text of a module file, or of the copy of `stdlib/` compiled into the binary.
fn module_source(file: &str) -> String {
    if let Some(name) = file
        .strip_prefix("<stdlib>/")
        .and_then(|n| n.strip_suffix(".rhai"))
    {
        if let Some((_, src)) = crate::script::resolver::EMBEDDED_STDLIB
            .iter()
            .find(|(n, _)| *n == name)
        {
            return src.to_string();
        }
    }
    std::fs::read_to_string(file).unwrap_or_default()
}

/// `line:col` of a position (Rhai's own Display says "line 3, position 7").
fn line_col(pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{l}:{c}"),
        (Some(l), None) => format!("{l}"),
        _ => "?".to_string(),
    }
}

/// The innermost error and the file it happened in (errors inside imported modules and
/// script functions are wrapped).
fn innermost<'a>(file: &str, err: &'a EvalAltResult) -> (String, &'a EvalAltResult, Vec<String>) {
    let mut trail = Vec::new();
    let mut current = err;
    let mut current_file = file.to_string();
    loop {
        match current {
            EvalAltResult::ErrorInModule(name, inner, pos) => {
                trail.push(format!(
                    "in module `{name}` imported at {current_file}:{}",
                    line_col(*pos)
                ));
                current_file = name.clone();
                current = inner;
            }
            EvalAltResult::ErrorInFunctionCall(name, src, inner, pos) => {
                trail.push(format!(
                    "in call to `{name}` at {current_file}:{}",
                    line_col(*pos)
                ));
                if !src.is_empty() {
                    current_file = src.clone();
                }
                current = inner;
            }
            _ => return (current_file, current, trail),
        }
    }
}

/// Print a runtime error with its location in the file it happened in.
pub fn print_eval_error(file: &str, source: &str, err: &EvalAltResult) {
    eprintln!("error: {}", format_eval_error(file, source, err));
}

pub fn format_eval_error(file: &str, source: &str, err: &EvalAltResult) -> String {
    let (at_file, inner, trail) = innermost(file, err);
    let text = if at_file == file {
        source.to_string()
    } else {
        module_source(&at_file)
    };
    let message = match inner {
        EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
        EvalAltResult::ErrorStackOverflow(_) => {
            "too many call levels (more than --max-call-levels)".to_string()
        }
        EvalAltResult::ErrorTerminated(token, _)
            if token.is::<crate::script::stack::StackExhausted>() =>
        {
            crate::script::stack::StackExhausted::MESSAGE.to_string()
        }
        other => {
            let mut s = other.to_string();
            // Rhai appends " (line x, position y)"; the location is printed separately.
            if let Some(i) = s.rfind(" (line ") {
                s.truncate(i);
            }
            s
        }
    };
    let mut out = format_at(&at_file, &text, inner.position(), &message);
    // Deep recursion repeats one call thousands of times: each run is shown once, counted.
    let mut rev = trail.iter().rev().peekable();
    while let Some(t) = rev.next() {
        let mut times = 1;
        while rev.peek() == Some(&t) {
            rev.next();
            times += 1;
        }
        if times > 1 {
            out.push_str(&format!("\n  {t} (x{times})"));
        } else {
            out.push_str(&format!("\n  {t}"));
        }
    }
    out
}

/// Every parse error: after each one the offending line is blanked and parsing resumes, so a
/// file with several mistakes reports them all at once.
pub fn all_parse_errors(engine: &Engine, source: &str) -> Vec<ParseError> {
    let mut lines: Vec<String> = source.lines().map(str::to_string).collect();
    let mut errors: Vec<ParseError> = Vec::new();
    for _ in 0..50 {
        match engine.compile(lines.join("\n")) {
            Ok(_) => break,
            Err(e) => {
                let Some(line) = e.position().line() else {
                    errors.push(e);
                    break;
                };
                if errors.iter().any(|p| p.position() == e.position()) || line > lines.len() {
                    // Blanking did not move the parser on: the rest is one error.
                    if !errors.iter().any(|p| p.position() == e.position()) {
                        errors.push(e);
                    }
                    break;
                }
                lines[line - 1] = String::new();
                errors.push(e);
            }
        }
    }
    errors
}
