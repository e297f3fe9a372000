//! `lpo schedule FILE.toml [--once]`: run jobs when they are due, as child processes
//! (`lpo run`), with a ledger beside the file.
//!
//! Rules:
//! - A cron job is due when its latest occurrence at or before now is later than the last slot
//!   it was started for, and not earlier than the first time this schedule was seen (the
//!   ledger's `created` record): missed occurrences are caught up once, not one by one.
//! - An `after` job is due after each successful end of the job it follows.
//! - A job whose last start has no end is running if its process is alive, its run folder is
//!   locked or the scheduler that started it still holds the job's lock (it keeps it until the
//!   end record is written): it is never started twice. Otherwise it was interrupted (SIGKILL,
//!   reboot) and is resumed with `lpo run --resume` on its run folder (a no-op exiting 0 when
//!   the run had finished). A job that ended interrupted (exit 130/143 or killed by a signal) is
//!   resumed too.
//! - A job failing (any other non-zero exit) is retried up to `retries` times in fresh run
//!   folders, waiting `backoff_seconds * 2^(n-1)` before retry n; then a `gave_up` record is
//!   written and `--once` exits 1.
//! - Jobs run one at a time, in dependency order.

pub mod config;
pub mod ledger;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::runtime::run_dir::RunDir;
use config::{Job, Schedule, Trigger};
use ledger::{Event, Ledger, Record};

/// Exit code for a schedule file that cannot be used.
pub const EXIT_INVALID: i32 = 65;

/// The scheduler's clock: real time, or real time shifted to start at `--now` (tests).
#[derive(Clone)]
pub struct Clock {
    start: DateTime<Utc>,
    started: Instant,
}

impl Clock {
    pub fn real() -> Self {
        Self {
            start: Utc::now(),
            started: Instant::now(),
        }
    }

    pub fn starting_at(start: DateTime<Utc>) -> Self {
        Self {
            start,
            started: Instant::now(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.start + chrono::Duration::from_std(self.started.elapsed()).unwrap_or_default()
    }
}

/// What the scheduler will do for a job now.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start afresh (a new run folder) for `slot` (a cron occurrence or `after:<job>`).
    Start { slot: String, attempt: u32 },
    /// Continue an interrupted run in its folder.
    Resume {
        run_dir: PathBuf,
        slot: String,
        attempt: u32,
    },
    /// A retry after a failure, not before `not_before`.
    Retry {
        slot: String,
        attempt: u32,
        not_before: DateTime<Utc>,
    },
    /// Running in another process: leave it alone.
    Running { pid: Option<u32> },
}

/// Entry point of `lpo schedule`; returns the exit code.
pub fn main(file: &Path, once: bool, now: Option<&str>, stop_after: Option<f64>) -> i32 {
    if !file.is_file() {
        eprintln!("error: schedule file not found: {}", file.display());
        return 66;
    }
    let schedule = match Schedule::load(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_INVALID;
        }
    };
    let clock = match now {
        None => Clock::real(),
        Some(text) => match DateTime::parse_from_rfc3339(text) {
            Ok(t) => Clock::starting_at(t.with_timezone(&Utc)),
            Err(e) => {
                eprintln!("error: --now `{text}`: not an RFC 3339 time ({e})");
                return 2;
            }
        },
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    let scheduler = Scheduler {
        ledger: Ledger::beside(&schedule.file),
        schedule,
        clock,
        stop,
    };
    if once {
        scheduler.run_once()
    } else {
        scheduler.run_forever(stop_after.map(Duration::from_secs_f64))
    }
}

pub struct Scheduler {
    pub schedule: Schedule,
    pub ledger: Ledger,
    pub clock: Clock,
    stop: Arc<AtomicBool>,
}

fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as i32, 0) };
    let exists = r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // A zombie (dead, not yet reaped) is not running.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    exists && !zombie
}

/// Exit codes that mean "interrupted": resumed rather than retried.
fn interrupted(code: i32) -> bool {
    matches!(code, 130 | 143) || code == 128 + libc::SIGKILL || code == 128 + libc::SIGHUP
}

impl Scheduler {
    /// The action for `job` at `now`, from the ledger's records.
    pub fn action(&self, job: &Job, records: &[Record], now: DateTime<Utc>) -> Option<Action> {
        let created = records
            .iter()
            .find(|r| r.event == Event::Created)
            .map(|r| r.time)
            .unwrap_or(now);
        let mine: Vec<(usize, &Record)> = records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.job.as_deref() == Some(job.name.as_str()))
            .collect();
        let last_start = mine.iter().rev().find(|(_, r)| r.event == Event::Start);
        // 1. An unfinished or interrupted run.
        if let Some((start_idx, start)) = last_start {
            let end = mine
                .iter()
                .find(|(i, r)| i > start_idx && r.event == Event::End);
            let gave_up = mine
                .iter()
                .any(|(i, r)| i > start_idx && r.event == Event::GaveUp);
            let run_dir = start.run_dir.clone().unwrap_or_default();
            let slot = start.slot.clone().unwrap_or_default();
            let attempt = start.attempt.unwrap_or(1);
            match end {
                None => {
                    let alive = start.pid.is_some_and(pid_alive)
                        || RunDir::is_locked(&run_dir)
                        || self.ledger.job_locked(&job.name);
                    if alive {
                        return Some(Action::Running { pid: start.pid });
                    }
                    return Some(Action::Resume {
                        run_dir,
                        slot,
                        attempt,
                    });
                }
                Some((_, end)) => {
                    let code = end.exit_code.unwrap_or(1);
                    if interrupted(code) {
                        return Some(Action::Resume {
                            run_dir,
                            slot,
                            attempt,
                        });
                    }
                    if code != 0 && !gave_up && attempt <= job.retries {
                        let wait = job.backoff_seconds * 2f64.powi(attempt as i32 - 1);
                        let not_before =
                            end.time + chrono::Duration::milliseconds((wait * 1000.0) as i64);
                        return Some(Action::Retry {
                            slot,
                            attempt: attempt + 1,
                            not_before,
                        });
                    }
                }
            }
        }
        // 2. A new slot.
        match &job.trigger {
            Trigger::Cron(cron, _) => {
                let occurrence = cron.find_previous_occurrence(&now, true).ok()?;
                // Occurrences in the second the schedule was first seen count.
                if occurrence < chrono::SubsecRound::trunc_subsecs(created, 0) {
                    return None;
                }
                let slot = occurrence.to_rfc3339();
                let started_slot = last_start
                    .and_then(|(_, r)| r.slot.as_deref())
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok());
                if started_slot.is_some_and(|s| s >= occurrence) {
                    return None;
                }
                Some(Action::Start { slot, attempt: 1 })
            }
            Trigger::After(dep) => {
                let since = last_start.map(|(i, _)| *i);
                let dep_ok = records.iter().enumerate().rev().find(|(i, r)| {
                    since.is_none_or(|s| *i > s)
                        && r.job.as_deref() == Some(dep.as_str())
                        && r.event == Event::End
                        && r.exit_code == Some(0)
                });
                dep_ok.map(|(i, _)| Action::Start {
                    slot: format!("after:{dep}#{i}"),
                    attempt: 1,
                })
            }
        }
    }

    fn log(&self, text: &str) {
        tracing::info!("schedule {}: {text}", self.schedule.file.display());
    }

    /// Run what is due now (and what becomes due by it: `after` jobs, retries), then return.
    pub fn run_once(&self) -> i32 {
        let mut failures = 0;
        let mut reported_running = Vec::new();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return 130;
            }
            let step = match self.step(&mut reported_running) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return 1;
                }
            };
            match step {
                Step::Ran { gave_up } => failures += gave_up as i32,
                Step::WaitUntil(t) => {
                    let wait = (t - self.clock.now()).to_std().unwrap_or_default();
                    self.log(&format!("waiting {:.1} s for a retry", wait.as_secs_f64()));
                    self.sleep(wait);
                }
                Step::Idle => break,
            }
        }
        if failures > 0 {
            eprintln!(
                "schedule: {failures} job(s) failed after their retries (see the ledger {})",
                self.ledger.path().display()
            );
            1
        } else {
            0
        }
    }

    /// Stay in the foreground: run jobs as they become due.
    pub fn run_forever(&self, stop_after: Option<Duration>) -> i32 {
        let started = Instant::now();
        let mut reported_running = Vec::new();
        self.log("started (foreground)");
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return 130;
            }
            if stop_after.is_some_and(|d| started.elapsed() >= d) {
                return 0;
            }
            match self.step(&mut reported_running) {
                Ok(Step::Ran { .. }) => continue,
                Ok(Step::WaitUntil(t)) => {
                    let wait = (t - self.clock.now()).to_std().unwrap_or_default();
                    self.sleep(wait.min(Duration::from_secs_f64(self.schedule.poll_seconds)));
                }
                Ok(Step::Idle) => {
                    let wait = self
                        .next_occurrence()
                        .map(|t| (t - self.clock.now()).to_std().unwrap_or_default());
                    let poll = Duration::from_secs_f64(self.schedule.poll_seconds);
                    let mut wait = wait.map_or(poll, |w| w.min(poll));
                    if let Some(limit) = stop_after {
                        wait = wait.min(limit.saturating_sub(started.elapsed()));
                    }
                    self.sleep(wait.max(Duration::from_millis(50)));
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    self.sleep(Duration::from_secs_f64(self.schedule.poll_seconds));
                }
            }
        }
    }

    fn next_occurrence(&self) -> Option<DateTime<Utc>> {
        let now = self.clock.now();
        self.schedule
            .jobs
            .iter()
            .filter_map(|j| match &j.trigger {
                Trigger::Cron(c, _) => c.find_next_occurrence(&now, false).ok(),
                Trigger::After(_) => None,
            })
            .min()
    }

    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end && !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
        }
    }

    /// Decide under the schedule lock, start one job, wait for it, record its end.
    fn step(&self, reported_running: &mut Vec<String>) -> anyhow::Result<Step> {
        let guard = self.ledger.lock()?;
        let now = self.clock.now();
        let records = self.ledger.read_or_create(now)?;
        let mut earliest_retry: Option<DateTime<Utc>> = None;
        let mut chosen = None;
        for job in &self.schedule.jobs {
            match self.action(job, &records, now) {
                None => {}
                Some(Action::Running { pid }) if !reported_running.contains(&job.name) => {
                    reported_running.push(job.name.clone());
                    let pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                    self.log(&format!(
                        "job `{}` is already running{pid}: not started again",
                        job.name
                    ));
                    self.ledger.append(
                        &Record::new(now, Event::Skipped)
                            .job(&job.name)
                            .reason("already running"),
                    )?;
                }
                Some(Action::Running { .. }) => {}
                Some(Action::Retry {
                    not_before,
                    slot,
                    attempt,
                }) if not_before > now => {
                    let _ = (slot, attempt);
                    earliest_retry = Some(earliest_retry.map_or(not_before, |t| t.min(not_before)));
                }
                Some(action) => {
                    // Owned from here until its end record is written.
                    if let Some(job_lock) = self.ledger.try_lock_job(&job.name)? {
                        chosen = Some((job.clone(), action, job_lock));
                        break;
                    }
                }
            }
        }
        let Some((job, action, job_lock)) = chosen else {
            return Ok(match earliest_retry {
                Some(t) => Step::WaitUntil(t),
                None => Step::Idle,
            });
        };
        let (run_dir, slot, attempt, resume) = match action {
            Action::Start { slot, attempt } | Action::Retry { slot, attempt, .. } => {
                (self.fresh_run_dir(&job.name), slot, attempt, false)
            }
            Action::Resume {
                run_dir,
                slot,
                attempt,
            } => (run_dir, slot, attempt, true),
            Action::Running { .. } => unreachable!("filtered above"),
        };
        let mut cmd = self.command(&job, &run_dir, resume)?;
        self.log(&format!(
            "{} job `{}` (attempt {attempt}, {slot}) in {}",
            if resume { "resuming" } else { "starting" },
            job.name,
            run_dir.display()
        ));
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.ledger.append(
                    &Record::new(now, Event::Start)
                        .job(&job.name)
                        .attempt(attempt)
                        .slot(&slot)
                        .run_dir(&run_dir),
                )?;
                self.ledger.append(
                    &Record::new(self.clock.now(), Event::End)
                        .job(&job.name)
                        .attempt(attempt)
                        .run_dir(&run_dir)
                        .exit_code(127)
                        .reason(&format!("cannot start lpo: {e}")),
                )?;
                return Ok(Step::Ran { gave_up: false });
            }
        };
        let mut start = Record::new(now, Event::Start)
            .job(&job.name)
            .attempt(attempt)
            .slot(&slot)
            .run_dir(&run_dir);
        start.pid = Some(child.id());
        start.resume = Some(resume);
        self.ledger.append(&start)?;
        drop(guard);
        let status = child.wait()?;
        let code = match status.code() {
            Some(c) => c,
            None => {
                use std::os::unix::process::ExitStatusExt;
                128 + status.signal().unwrap_or(0)
            }
        };
        let _guard = self.ledger.lock()?;
        let end_time = self.clock.now();
        let status_word = if code == 0 {
            "ok"
        } else if interrupted(code) {
            "interrupted"
        } else {
            "failed"
        };
        self.ledger.append(
            &Record::new(end_time, Event::End)
                .job(&job.name)
                .attempt(attempt)
                .run_dir(&run_dir)
                .exit_code(code)
                .reason(status_word),
        )?;
        self.log(&format!(
            "job `{}` ended: {status_word} (exit code {code})",
            job.name
        ));
        let mut gave_up = false;
        if status_word == "failed" && attempt > job.retries {
            gave_up = true;
            self.ledger.append(
                &Record::new(end_time, Event::GaveUp)
                    .job(&job.name)
                    .attempt(attempt)
                    .run_dir(&run_dir)
                    .exit_code(code)
                    .reason(&format!(
                        "failed {attempt} time(s); retries = {}",
                        job.retries
                    )),
            )?;
            eprintln!(
                "schedule: job `{}` failed {attempt} time(s) (last exit code {code}, run folder {}); giving up",
                job.name,
                run_dir.display()
            );
        }
        // Released before the schedule lock: whoever decides next sees the end record.
        drop(job_lock);
        Ok(Step::Ran { gave_up })
    }

    fn fresh_run_dir(&self, job: &str) -> PathBuf {
        RunDir::default_path(&self.schedule.runs_dir, Path::new(job))
    }

    fn command(&self, job: &Job, run_dir: &Path, resume: bool) -> anyhow::Result<Command> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.current_dir(&self.schedule.base);
        // Paths handed to the child are absolute: it runs in the schedule's folder.
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        cmd.arg("run");
        if resume {
            cmd.arg("--resume").arg(abs(run_dir));
        } else {
            cmd.arg(abs(&job.script)).arg("--run-dir").arg(abs(run_dir));
            cmd.arg("--params-json").arg(job.params.to_string());
            if let Some(d) = &job.device {
                cmd.arg("--device").arg(d);
            }
            if let Some(s) = job.seed {
                cmd.arg("--seed").arg(s.to_string());
            }
        }
        if let Some(t) = job.timeout_seconds {
            cmd.arg("--timeout").arg(t.to_string());
        }
        // A job writes its own run folder and only the folders its entry allows.
        for dir in &job.allow_read {
            cmd.arg("--allow-read").arg(abs(dir));
        }
        for dir in &job.allow_write {
            cmd.arg("--allow-write").arg(abs(dir));
        }
        Ok(cmd)
    }
}

enum Step {
    Ran { gave_up: bool },
    WaitUntil(DateTime<Utc>),
    Idle,
}
