//! The run's one-page HTML report (PNGs embedded by relative path) and its `summary.json`
//! (n, before, after, delta, ci95_low, ci95_high) for outside checks.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::Value;

use super::number::{format_number, format_signed};
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
    pub extra: serde_json::Map<String, Value>,
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
    /// Further name / value rows (shown in order; maps and lists as indented JSON).
    pub table: Vec<(String, Value)>,
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

/// A value cell: numbers by magnitude, strings as text, nested maps and lists as indented
/// JSON in a wrapping `<pre>` (a compact one-line JSON cell would overflow the page).
fn value_cell(v: &Value) -> String {
    if let Some(table) = records_table(v) {
        return table;
    }
    match v {
        Value::Number(_) | Value::Bool(_) | Value::Null => escape_html(&pretty_json(v)),
        Value::String(s) => escape_html(s),
        Value::Array(_) | Value::Object(_) => {
            format!("<pre class=\"json\">{}</pre>", escape_html(&pretty_json(v)))
        }
    }
}

/// A list of flat records (maps of scalars, e.g. one row of numbers per metric) as an HTML table:
/// one column per key, text columns (labels) first, then the others in key order.
fn records_table(v: &Value) -> Option<String> {
    let rows = v.as_array()?;
    if rows.is_empty() {
        return None;
    }
    let mut text_cols: Vec<&String> = Vec::new();
    let mut other_cols: Vec<&String> = Vec::new();
    for r in rows {
        for (k, x) in r.as_object()? {
            if x.is_array() || x.is_object() {
                return None;
            }
            if !text_cols.contains(&k) && !other_cols.contains(&k) {
                if x.is_string() {
                    text_cols.push(k);
                } else {
                    other_cols.push(k);
                }
            }
        }
    }
    let cols: Vec<&String> = text_cols.into_iter().chain(other_cols).collect();
    let mut h = String::from("<table><tr>");
    for c in &cols {
        h.push_str(&format!("<th>{}</th>", escape_html(c)));
    }
    h.push_str("</tr>\n");
    for r in rows {
        let m = r.as_object()?;
        h.push_str("<tr>");
        for c in &cols {
            let cell = m.get(*c).map(|x| match x {
                Value::String(t) => escape_html(t),
                other => escape_html(&pretty_json(other)),
            });
            h.push_str(&format!("<td>{}</td>", cell.unwrap_or_default()));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>");
    Some(h)
}

/// Indented JSON whose numbers are written by [`format_number`] (still valid JSON: finite
/// numbers only reach a `Value`); maps and lists short enough stay on one line.
pub fn pretty_json(v: &Value) -> String {
    let mut out = String::new();
    write_json(v, 0, &mut out);
    out
}

/// Longest map or list written on one line.
const INLINE_WIDTH: usize = 100;

fn write_json(v: &Value, depth: usize, out: &mut String) {
    let one_line = inline_json(v);
    if one_line.len() <= INLINE_WIDTH || !(v.is_array() || v.is_object()) {
        out.push_str(&one_line);
        return;
    }
    let indent = |d: usize| "  ".repeat(d);
    let (open, close, items): (&str, &str, Vec<(Option<&String>, &Value)>) = match v {
        Value::Array(items) => ("[", "]", items.iter().map(|x| (None, x)).collect()),
        Value::Object(map) => ("{", "}", map.iter().map(|(k, x)| (Some(k), x)).collect()),
        _ => unreachable!("scalars are written inline"),
    };
    out.push_str(open);
    out.push('\n');
    for (i, (key, x)) in items.iter().enumerate() {
        out.push_str(&indent(depth + 1));
        if let Some(k) = key {
            out.push_str(&format!("{}: ", Value::from(k.as_str())));
        }
        write_json(x, depth + 1, out);
        out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
    }
    out.push_str(&indent(depth));
    out.push_str(close);
}

/// `v` as one line of JSON, numbers by [`format_number`].
fn inline_json(v: &Value) -> String {
    match v {
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => format_number(f),
            _ => n.to_string(),
        },
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(inline_json).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, x)| format!("{}: {}", Value::from(k.as_str()), inline_json(x)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        other => other.to_string(),
    }
}

/// Name / value rows in a fixed-layout table that wraps long values within the page.
fn settings_table<'a>(rows: impl Iterator<Item = (&'a String, &'a Value)>) -> String {
    let mut h =
        String::from("<table class=\"settings\"><colgroup><col class=\"key\"><col></colgroup>\n");
    for (k, v) in rows {
        h.push_str(&format!(
            "<tr><th>{}</th><td>{}</td></tr>\n",
            escape_html(k),
            value_cell(v)
        ));
    }
    h.push_str("</table>\n");
    h
}

/// The report as HTML text.
pub fn render_html(report: &Report) -> String {
    let mut h = String::new();
    let title = escape_html(&report.title);
    h.push_str(&format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>\
body{{font-family:sans-serif;max-width:1360px;margin:2em auto;padding:0 1em;color:#222}}\
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left;vertical-align:top}}\
table.settings{{table-layout:fixed;width:100%}}table.settings col.key{{width:14em}}\
table.settings th,table.settings td{{overflow-wrap:anywhere}}\
pre.json{{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}}\
figure{{display:inline-block;margin:0.5em;vertical-align:top}}img{{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}}\
figcaption{{font-size:0.9em;color:#555}}.sig{{color:#070}}.nosig{{color:#a60}}\
</style></head><body>\n<h1>{title}</h1>\n"
    ));
    if let Some(s) = &report.summary {
        let sig = s.ci95_low > 0.0 || s.ci95_high < 0.0;
        h.push_str(&format!(
            "<p class=\"{}\"><b>Change {}</b> (95% CI [{}, {}], n = {}): {}.</p>\n",
            if sig { "sig" } else { "nosig" },
            format_signed(s.delta),
            format_signed(s.ci95_low),
            format_signed(s.ci95_high),
            s.n,
            if sig {
                "the interval excludes 0"
            } else {
                "the interval includes 0"
            }
        ));
        h.push_str("<table><tr><th>n</th><th>before</th><th>after</th><th>delta</th><th>ci95_low</th><th>ci95_high</th></tr>\n");
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>\n",
            s.n,
            format_number(s.before),
            format_number(s.after),
            format_signed(s.delta),
            format_signed(s.ci95_low),
            format_signed(s.ci95_high)
        ));
        if !s.extra.is_empty() {
            h.push_str(&settings_table(s.extra.iter()));
        }
    }
    if !report.table.is_empty() {
        h.push_str(&settings_table(report.table.iter().map(|(k, v)| (k, v))));
    }
    for note in &report.notes {
        h.push_str(&format!("<p>{}</p>\n", escape_html(note)));
    }
    for fig in &report.figures {
        h.push_str(&format!(
            "<figure><a href=\"{path}\"><img src=\"{path}\" alt=\"{caption}\"></a>\
<figcaption>{caption}</figcaption></figure>\n",
            path = escape_html(&fig.path),
            caption = escape_html(&fig.caption),
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
