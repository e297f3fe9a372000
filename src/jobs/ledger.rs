//! The ledger `<schedule-stem>.ledger.jsonl` beside the schedule file: one JSON object per line
//! (`created`, then `start`, `end`, `skipped`, `gave_up` records of jobs), a lock file
//! `<schedule-stem>.lock` that serializes the schedulers deciding what to start, and one lock
//! file per job, `<schedule-stem>.job-<name>.lock`, held by the scheduler that started the job
//! until its end record is written (so no other scheduler takes a finished job, whose process
//! is gone, for an interrupted one).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Created,
    Start,
    End,
    Skipped,
    GaveUp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub time: DateTime<Utc>,
    pub event: Event,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The cron occurrence (RFC 3339) or `after:<job>#<ledger line>` that made the job due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Record {
    pub fn new(time: DateTime<Utc>, event: Event) -> Self {
        Self {
            time,
            event,
            job: None,
            attempt: None,
            slot: None,
            run_dir: None,
            pid: None,
            resume: None,
            exit_code: None,
            reason: None,
        }
    }
    pub fn job(mut self, job: &str) -> Self {
        self.job = Some(job.into());
        self
    }
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = Some(attempt);
        self
    }
    pub fn slot(mut self, slot: &str) -> Self {
        self.slot = Some(slot.into());
        self
    }
    pub fn run_dir(mut self, dir: &Path) -> Self {
        self.run_dir = Some(dir.to_path_buf());
        self
    }
    pub fn exit_code(mut self, code: i32) -> Self {
        self.exit_code = Some(code);
        self
    }
    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

pub struct Ledger {
    path: PathBuf,
    lock_path: PathBuf,
}

/// Held while a scheduler decides and starts a job.
pub struct LockGuard(File);

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl Ledger {
    pub fn beside(schedule: &Path) -> Self {
        let stem = schedule
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "schedule".into());
        let dir = schedule
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self {
            path: dir.join(format!("{stem}.ledger.jsonl")),
            lock_path: dir.join(format!("{stem}.lock")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn lock(&self) -> Result<LockGuard> {
        let f = open_lock_file(&self.lock_path)?;
        f.lock()
            .with_context(|| format!("cannot lock {}", self.lock_path.display()))?;
        Ok(LockGuard(f))
    }

    fn job_lock_path(&self, job: &str) -> PathBuf {
        let name = self
            .lock_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "schedule".into());
        self.lock_path
            .with_file_name(format!("{name}.job-{job}.lock"))
    }

    /// Take the lock of `job` for as long as this scheduler owns its run (from its start until
    /// its end record is written); None when another process holds it.
    pub fn try_lock_job(&self, job: &str) -> Result<Option<LockGuard>> {
        let path = self.job_lock_path(job);
        let f = open_lock_file(&path)?;
        match f.try_lock() {
            Ok(()) => Ok(Some(LockGuard(f))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }

    /// True when a live scheduler owns the run of `job` (see [`Ledger::try_lock_job`]).
    pub fn job_locked(&self, job: &str) -> bool {
        let path = self.job_lock_path(job);
        if !path.exists() {
            return false;
        }
        // A successful probe locks and unlocks at once (the file is closed).
        open_lock_file(&path)
            .is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)))
    }

    /// Every record; a missing ledger is created with its `created` record. A torn last line
    /// (a crash mid-write) is skipped; any other bad line is an error naming it.
    pub fn read_or_create(&self, now: DateTime<Utc>) -> Result<Vec<Record>> {
        if !self.path.exists() {
            self.append(&Record::new(now, Event::Created))?;
        }
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Record>(line) {
                Ok(r) => out.push(r),
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
                Err(e) => anyhow::bail!(
                    "{}:{}: not a ledger record: {e}",
                    self.path.display(),
                    i + 1
                ),
            }
        }
        Ok(out)
    }

    pub fn append(&self, record: &Record) -> Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        let line = serde_json::to_string(record)?;
        f.write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        f.sync_data().ok();
        Ok(())
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}
