//! The log of a run: tracing goes to stderr and, once a run folder is open, to its `run.log`
//! too; progress bars (on a TTY) are suspended while a log line is written.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

static LOG_FILE: Mutex<Option<File>> = Mutex::new(None);
static BARS: OnceLock<indicatif::MultiProgress> = OnceLock::new();

/// The progress bars of this process (drawn on stderr).
pub fn bars() -> &'static indicatif::MultiProgress {
    BARS.get_or_init(|| {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr())
    })
}

/// From now on, every log line is also appended to `path`.
pub fn tee_to(path: &Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    *LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    Ok(())
}

/// Write `text` (a line) to the run log only (e.g. the final error report, printed on stderr
/// separately).
pub fn to_file(text: &str) {
    if let Some(f) = LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let _ = writeln!(f, "{}", strip_ansi(text));
    }
}

/// `eprintln!` that also lands in the run log.
pub fn report(text: &str) {
    bars().suspend(|| eprintln!("{text}"));
    to_file(text);
}

/// The tracing writer: stderr plus the run log.
pub struct TeeWriter;

impl TeeWriter {
    pub fn make() -> TeeWriter {
        TeeWriter
    }
}

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        bars().suspend(|| std::io::stderr().write_all(buf))?;
        if let Some(f) = LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = f.write_all(strip_ansi(&String::from_utf8_lossy(buf)).as_bytes());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Remove ANSI escape sequences (colours) from `s`.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_colours() {
        assert_eq!(super::strip_ansi("\u{1b}[32m INFO\u{1b}[0m x"), " INFO x");
    }
}
