//! The run's one-page HTML report (PNGs embedded by relative path) and its `summary.json`
//! (n, before, after, delta, ci95_low, ci95_high) for outside checks.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::fsutil::atomic_write;

/// The headline numbers of an evaluation (alignment as fractions), plus any extra fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub before: f64,
    pub after: f64,
    pub delta: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Summary {
    pub fn from_bootstrap(b: &super::PairedBootstrap) -> Self {
        Self {
            n: b.n,
            before: b.before,
            after: b.after,
            delta: b.delta,
            ci95_low: b.ci95_low,
            ci95_high: b.ci95_high,
            extra: Default::default(),
        }
    }

    /// Check the fields are finite and ordered (ci95_low <= ci95_high).
    pub fn validate(&self) -> Result<()> {
        for (k, v) in [
            ("before", self.before),
            ("after", self.after),
            ("delta", self.delta),
            ("ci95_low", self.ci95_low),
            ("ci95_high", self.ci95_high),
        ] {
            if !v.is_finite() {
                bail!("summary: `{k}` is not finite ({v})");
            }
        }
        if self.ci95_low > self.ci95_high {
            bail!(
                "summary: ci95_low {} > ci95_high {}",
                self.ci95_low,
                self.ci95_high
            );
        }
        Ok(())
    }
}

/// Write `summary` as pretty JSON at `path` (atomically).
pub fn write_summary(path: &Path, summary: &Summary) -> Result<()> {
    summary.validate()?;
    let text = serde_json::to_string_pretty(summary)?;
    atomic_write(path, text.as_bytes())
}

/// An image of the report: a path relative to the report's folder and a caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub path: String,
    pub caption: String,
}

/// The content of the one-page report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub title: String,
    /// Free text paragraphs.
    pub notes: Vec<String>,
    /// Written to `summary.json` and shown as the headline table.
    pub summary: Option<Summary>,
    /// Further name / value rows (shown in order).
    pub table: Vec<(String, String)>,
    pub figures: Vec<Figure>,
}

pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

fn json_cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) => n.as_f64().map(fmt_num).unwrap_or_else(|| n.to_string()),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The report as HTML text.
pub fn render_html(report: &Report) -> String {
    let mut h = String::new();
    let title = escape_html(&report.title);
    h.push_str(&format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>\
body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}\
figure{{display:inline-block;margin:0.5em;vertical-align:top}}img{{max-width:520px;image-rendering:pixelated;border:1px solid #ddd}}\
figcaption{{font-size:0.9em;color:#555}}.sig{{color:#070}}.nosig{{color:#a60}}\
</style></head><body>\n<h1>{title}</h1>\n"
    ));
    if let Some(s) = &report.summary {
        let sig = s.ci95_low > 0.0 || s.ci95_high < 0.0;
        h.push_str(&format!(
            "<p class=\"{}\"><b>Change {:+.4}</b> (95% CI [{:.4}, {:.4}], n = {}): {}.</p>\n",
            if sig { "sig" } else { "nosig" },
            s.delta,
            s.ci95_low,
            s.ci95_high,
            s.n,
            if sig {
                "the interval excludes 0"
            } else {
                "the interval includes 0"
            }
        ));
        h.push_str("<table><tr><th>n</th><th>before</th><th>after</th><th>delta</th><th>ci95_low</th><th>ci95_high</th></tr>\n");
        h.push_str(&format!(
            "<tr><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:+.4}</td><td>{:+.4}</td><td>{:+.4}</td></tr></table>\n",
            s.n, s.before, s.after, s.delta, s.ci95_low, s.ci95_high
        ));
        if !s.extra.is_empty() {
            h.push_str("<table>\n");
            for (k, v) in &s.extra {
                h.push_str(&format!(
                    "<tr><th>{}</th><td>{}</td></tr>\n",
                    escape_html(k),
                    escape_html(&json_cell(v))
                ));
            }
            h.push_str("</table>\n");
        }
    }
    if !report.table.is_empty() {
        h.push_str("<table>\n");
        for (k, v) in &report.table {
            h.push_str(&format!(
                "<tr><th>{}</th><td>{}</td></tr>\n",
                escape_html(k),
                escape_html(v)
            ));
        }
        h.push_str("</table>\n");
    }
    for note in &report.notes {
        h.push_str(&format!("<p>{}</p>\n", escape_html(note)));
    }
    for fig in &report.figures {
        h.push_str(&format!(
            "<figure><img src=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>\n",
            escape_html(&fig.path),
            escape_html(&fig.caption),
            escape_html(&fig.caption)
        ));
    }
    h.push_str("</body></html>\n");
    h
}

/// Write `dir/report.html` (and `dir/summary.json` when the report has a summary). Figure
/// paths must be relative to `dir`; a missing figure file is an error naming it. Returns the
/// path of the HTML file.
pub fn write_report(dir: &Path, report: &Report) -> Result<PathBuf> {
    for fig in &report.figures {
        let p = Path::new(&fig.path);
        if p.is_absolute() {
            bail!(
                "write_report: figure path {} must be relative to the report folder {}",
                fig.path,
                dir.display()
            );
        }
        if !dir.join(p).is_file() {
            bail!(
                "write_report: figure {} not found in {}",
                fig.path,
                dir.display()
            );
        }
    }
    if let Some(s) = &report.summary {
        write_summary(&dir.join("summary.json"), s)?;
    }
    let path = dir.join("report.html");
    atomic_write(&path, render_html(report).as_bytes())?;
    Ok(path)
}
