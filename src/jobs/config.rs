//! The schedule file (TOML): jobs with a script, params, and either a cron expression or
//! `after = "other-job"`. Every mistake is reported with its line.
//!
//! ```toml
//! runs_dir = "runs"              # run folders of the jobs (relative to this file's folder)
//! poll_seconds = 30              # foreground mode: how often the clock is checked at most
//!
//! [jobs.train]
//! script = "scripts/train.rhai"  # relative to this file's folder
//! cron = "0 3 * * *"             # minute hour day month weekday (optional leading seconds)
//! params = { steps = 1000 }
//! retries = 2                    # attempts after the first failure
//! allow_write = ["models"]       # folders the job may write besides its run folder (--allow-write)
//! backoff_seconds = 60           # wait before retry n: backoff_seconds * 2^(n-1)
//!
//! [jobs.eval]
//! script = "scripts/eval.rhai"
//! after = "train"                # runs after each successful end of `train`
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default)]
    runs_dir: Option<String>,
    #[serde(default)]
    poll_seconds: Option<f64>,
    #[serde(default)]
    jobs: BTreeMap<String, JobToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobToml {
    script: Spanned<String>,
    #[serde(default)]
    params: Option<toml::Table>,
    #[serde(default)]
    cron: Option<Spanned<String>>,
    #[serde(default)]
    after: Option<Spanned<String>>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    backoff_seconds: Option<f64>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    allow_read: Vec<String>,
    #[serde(default)]
    allow_write: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Trigger {
    Cron(Box<croner::Cron>, String),
    After(String),
}

#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub script: PathBuf,
    pub params: serde_json::Value,
    pub trigger: Trigger,
    pub retries: u32,
    pub backoff_seconds: f64,
    pub timeout_seconds: Option<f64>,
    pub device: Option<String>,
    pub seed: Option<u64>,
    /// `--allow-read` / `--allow-write` folders of the job (relative to this file's folder);
    /// without them a job writes only its own run folder.
    pub allow_read: Vec<PathBuf>,
    pub allow_write: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub file: PathBuf,
    /// The folder of the schedule file: jobs run there.
    pub base: PathBuf,
    pub runs_dir: PathBuf,
    pub poll_seconds: f64,
    /// In dependency order: a job comes after the job it runs `after`.
    pub jobs: Vec<Job>,
}

/// A schedule file that cannot be used: the message names the file, line and reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn header_line(text: &str, job: &str) -> Option<usize> {
    let patterns = [format!("[jobs.{job}]"), format!("[jobs.\"{job}\"]")];
    text.lines()
        .position(|l| {
            patterns
                .iter()
                .any(|p| l.trim_start().starts_with(p.as_str()))
        })
        .map(|i| i + 1)
}

impl Schedule {
    pub fn load(file: &Path) -> Result<Schedule, Invalid> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Invalid(format!("cannot read schedule {}: {e}", file.display())))?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Schedule, Invalid> {
        let name = file.display();
        let raw: FileToml = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!(":{}", line_of(text, s.start)))
                .unwrap_or_default();
            Invalid(format!("{name}{at}: {}", e.message().trim()))
        })?;
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        let mut jobs = Vec::new();
        let mut after_lines = HashMap::new();
        for (job_name, j) in raw.jobs {
            let job_line = header_line(text, &job_name)
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            if job_name.is_empty()
                || !job_name
                    .chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
            {
                return Err(Invalid(format!(
                    "{name}{job_line}: job name `{job_name}`: use letters, digits, `_` and `-`"
                )));
            }
            let trigger = match (j.cron, j.after) {
                (Some(_), Some(after)) => {
                    return Err(Invalid(format!(
                        "{name}:{}: job `{job_name}` has both `cron` and `after`; give one",
                        line_of(text, after.span().start)
                    )))
                }
                (None, None) => {
                    return Err(Invalid(format!(
                        "{name}{job_line}: job `{job_name}` needs `cron = \"...\"` or `after = \"other-job\"`"
                    )))
                }
                (Some(cron), None) => {
                    let expr = cron.get_ref().clone();
                    let at = line_of(text, cron.span().start);
                    match croner::Cron::from_str(&expr) {
                        // A valid pattern that matches no date (`0 0 31 2 *`) would never run.
                        Ok(c) if c.find_next_occurrence(&chrono::Utc::now(), false).is_err() => {
                            return Err(Invalid(format!(
                                "{name}:{at}: job `{job_name}`: cron expression `{expr}` never fires (no date matches it)"
                            )))
                        }
                        Ok(c) => Trigger::Cron(Box::new(c), expr),
                        Err(e) => {
                            return Err(Invalid(format!(
                                "{name}:{at}: job `{job_name}`: invalid cron expression `{expr}`: {e}"
                            )))
                        }
                    }
                }
                (None, Some(after)) => {
                    after_lines.insert(job_name.clone(), line_of(text, after.span().start));
                    Trigger::After(after.into_inner())
                }
            };
            let script_line = line_of(text, j.script.span().start);
            let script = base.join(j.script.get_ref());
            if !script.is_file() {
                return Err(Invalid(format!(
                    "{name}:{script_line}: job `{job_name}`: script not found: {}",
                    script.display()
                )));
            }
            let backoff_seconds = j.backoff_seconds.unwrap_or(60.0);
            if !(backoff_seconds.is_finite() && backoff_seconds >= 0.0) {
                return Err(Invalid(format!(
                    "{name}{job_line}: job `{job_name}`: backoff_seconds must be >= 0"
                )));
            }
            if j.timeout_seconds
                .is_some_and(|t| !(t.is_finite() && t > 0.0))
            {
                return Err(Invalid(format!(
                    "{name}{job_line}: job `{job_name}`: timeout_seconds must be > 0"
                )));
            }
            let params = toml_to_json(&toml::Value::Table(j.params.unwrap_or_default()))
                .map_err(|e| Invalid(format!("{name}{job_line}: job `{job_name}`: params: {e}")))?;
            jobs.push(Job {
                name: job_name,
                script,
                params,
                trigger,
                retries: j.retries.unwrap_or(0),
                backoff_seconds,
                timeout_seconds: j.timeout_seconds,
                device: j.device,
                seed: j.seed,
                allow_read: j.allow_read.iter().map(|p| base.join(p)).collect(),
                allow_write: j.allow_write.iter().map(|p| base.join(p)).collect(),
            });
        }
        // `after` must name a job, and the graph must have no cycle.
        let names: Vec<String> = jobs.iter().map(|j| j.name.clone()).collect();
        for j in &jobs {
            if let Trigger::After(dep) = &j.trigger {
                if !names.contains(dep) {
                    return Err(Invalid(format!(
                        "{name}:{}: job `{}`: `after = \"{dep}\"` names no job (jobs: {})",
                        after_lines[&j.name],
                        j.name,
                        names.join(", ")
                    )));
                }
            }
        }
        let ordered = topo_order(&jobs).map_err(|cycle| {
            let first = &cycle[0];
            Invalid(format!(
                "{name}:{}: dependency cycle in `after`: {}",
                after_lines.get(first).copied().unwrap_or(0),
                cycle
                    .iter()
                    .chain(std::iter::once(first))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" -> after -> ")
            ))
        })?;
        let poll_seconds = raw.poll_seconds.unwrap_or(30.0);
        if !(poll_seconds.is_finite() && poll_seconds > 0.0) {
            return Err(Invalid(format!("{name}: poll_seconds must be > 0")));
        }
        Ok(Schedule {
            file: file.to_path_buf(),
            runs_dir: base.join(raw.runs_dir.unwrap_or_else(|| "runs".into())),
            base,
            poll_seconds,
            jobs: ordered,
        })
    }

    pub fn job(&self, name: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.name == name)
    }
}

/// Params as the JSON `lpo run --params-json` reads (`nan` and `inf` kept as tagged floats).
fn toml_to_json(value: &toml::Value) -> Result<serde_json::Value, serde_json::Error> {
    Ok(match value {
        toml::Value::Float(x) => crate::run::params_json::float_to_json(*x),
        toml::Value::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| Ok((k.clone(), toml_to_json(v)?)))
                .collect::<Result<_, serde_json::Error>>()?,
        ),
        toml::Value::Array(a) => {
            serde_json::Value::Array(a.iter().map(toml_to_json).collect::<Result<_, _>>()?)
        }
        other => serde_json::to_value(other)?,
    })
}

/// Jobs in dependency order, or the names on a cycle.
fn topo_order(jobs: &[Job]) -> Result<Vec<Job>, Vec<String>> {
    let dep = |j: &Job| match &j.trigger {
        Trigger::After(d) => Some(d.clone()),
        Trigger::Cron(..) => None,
    };
    // Each job has at most one dependency: follow the chain to find cycles.
    for j in jobs {
        let mut seen = vec![j.name.clone()];
        let mut current = dep(j);
        while let Some(d) = current {
            if d == j.name {
                return Err(seen);
            }
            if seen.contains(&d) {
                break; // a cycle not through `j`: found from one of its members
            }
            seen.push(d.clone());
            current = jobs.iter().find(|x| x.name == d).and_then(dep);
        }
    }
    let mut out: Vec<Job> = Vec::new();
    while out.len() < jobs.len() {
        for j in jobs {
            if out.iter().any(|o| o.name == j.name) {
                continue;
            }
            if dep(j).is_none_or(|d| out.iter().any(|o| o.name == d)) {
                out.push(j.clone());
            }
        }
    }
    Ok(out)
}
