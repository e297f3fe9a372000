//! Run folders: one per headless run, locked by the process writing it.
//!
//! Layout of `runs/<stem>-<YYYYmmdd-HHMMSS>/`:
//! `script.rhai` (a copy of the script), `params.json` (params, seed, device, limits),
//! `run.log`, `metrics.jsonl`, `checkpoints/step-<N>/{tensors.safetensors,state.json}`,
//! `lock` (pid of the holder; an OS lock that dies with the process), `exit.json` (the exit code
//! once the run ended) and whatever the script writes under `run_dir()`.
//!
//! Each checkpoint records how long `metrics.jsonl` was when it was saved, so a resumed run
//! drops the rows logged after it (they are logged again) instead of repeating steps.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::runtime::control::StopReason;

/// Exit code of `lpo run` when the run folder is locked by another live process (EX_TEMPFAIL).
pub const EXIT_LOCKED: i32 = 75;

/// How the run ended: `{"exit_code": N, "time": unix seconds}`.
const EXIT_FILE: &str = "exit.json";

/// The key in a checkpoint's `state.json` with the length of `metrics.jsonl` at the save.
const METRICS_BYTES: &str = "metrics_bytes";

/// The run folder is held by another process.
#[derive(Debug, thiserror::Error)]
#[error("run folder {} is in use by process {} (lock file {}); refusing to write to it", .dir.display(), .pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()), .dir.join("lock").display())]
pub struct Locked {
    pub dir: PathBuf,
    pub pid: Option<u32>,
}

/// A checkpoint found on disk.
pub struct Checkpoint {
    pub step: i64,
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub state: serde_json::Value,
}

pub struct RunDir {
    path: PathBuf,
    _lock: File,
    /// How many checkpoints `checkpoint_save` keeps (the newest).
    pub keep_checkpoints: usize,
    /// Metric keys whose non-finite value halts the run.
    pub halt_on_nonfinite: Vec<String>,
    metrics: Mutex<()>,
    halted: AtomicBool,
    /// A stop asked for by a signal, not yet forced on the run control (see `run::signals`).
    soft_stop: AtomicU8,
    /// The script polls `should_stop()`: signals then wait for it to reach a safe point.
    cooperative: AtomicBool,
}

impl RunDir {
    /// Create (or open) `path` and take its lock; a live holder makes this fail with [`Locked`].
    pub fn open(path: &Path) -> Result<RunDir> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create run folder {}", path.display()))?;
        // Taking the lock and writing the pid into it happen under a short lock on the folder
        // itself, which a refused contender also holds while it reads the pid: it never reads
        // the lock file empty or half-written.
        let folder = File::open(path)
            .and_then(|f| f.lock().map(|()| f))
            .with_context(|| format!("cannot lock run folder {}", path.display()))?;
        let lock_path = path.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("cannot open lock file {}", lock_path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(Locked {
                    dir: path.to_path_buf(),
                    pid: text.trim().parse().ok(),
                }
                .into());
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        drop(folder);
        remove_stale_temporaries(&path.join("checkpoints"));
        Ok(RunDir {
            path: path.to_path_buf(),
            _lock: file,
            keep_checkpoints: 3,
            halt_on_nonfinite: vec!["loss".into()],
            metrics: Mutex::new(()),
            halted: AtomicBool::new(false),
            soft_stop: AtomicU8::new(0),
            cooperative: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when some live process holds the lock of the run folder at `path`.
    pub fn is_locked(path: &Path) -> bool {
        let Ok(file) = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path.join("lock"))
        else {
            return false;
        };
        matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
    }

    /// A fresh folder `base/<stem>-<YYYYmmdd-HHMMSS>` (with `-2`, `-3`.. when taken).
    pub fn default_path(base: &Path, script: &Path) -> PathBuf {
        let stem = script
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
        let first = base.join(format!("{stem}-{stamp}"));
        if !first.exists() {
            return first;
        }
        (2..)
            .map(|i| base.join(format!("{stem}-{stamp}-{i}")))
            .find(|p| !p.exists())
            .expect("an unused name exists")
    }

    pub fn checkpoints_dir(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    // ---- stop requests -------------------------------------------------------------------

    pub fn request_soft_stop(&self, reason: StopReason) {
        let code = match reason {
            StopReason::Interrupt => 1,
            StopReason::Terminate => 2,
            StopReason::Deadline => 3,
        };
        let _ = self
            .soft_stop
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn soft_stop(&self) -> Option<StopReason> {
        match self.soft_stop.load(Ordering::SeqCst) {
            1 => Some(StopReason::Interrupt),
            2 => Some(StopReason::Terminate),
            3 => Some(StopReason::Deadline),
            _ => None,
        }
    }

    pub fn mark_cooperative(&self) {
        self.cooperative.store(true, Ordering::SeqCst);
    }

    pub fn is_cooperative(&self) -> bool {
        self.cooperative.load(Ordering::SeqCst)
    }

    pub fn halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }

    // ---- checkpoints ---------------------------------------------------------------------

    /// Write `checkpoints/step-<step>/` atomically (a temporary folder renamed into place) and
    /// keep only the newest `keep_checkpoints`. Returns the folder.
    pub fn save_checkpoint(
        &self,
        step: i64,
        tensors: &HashMap<String, Tensor>,
        state: &serde_json::Value,
    ) -> Result<PathBuf> {
        if self.halted() {
            bail!("checkpoint_save: the run was halted by a non-finite metric; the last good checkpoint is kept");
        }
        if step < 0 {
            bail!("checkpoint_save: step {step} is negative");
        }
        let dir = self.checkpoints_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = dir.join(format!(".step-{step}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot remove {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let write = || -> Result<()> {
            crate::tensor::io::save_safetensors(tensors, &tmp.join("tensors.safetensors"))?;
            let mut meta = serde_json::Map::new();
            meta.insert("step".into(), step.into());
            meta.insert("state".into(), state.clone());
            meta.insert("time".into(), unix_time().into());
            meta.insert(METRICS_BYTES.into(), self.metrics_len().into());
            crate::fsutil::atomic_write(
                &tmp.join("state.json"),
                serde_json::to_string_pretty(&meta)?.as_bytes(),
            )?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let target = dir.join(format!("step-{step}"));
        if target.exists() {
            // Replace an older save of the same step: move it aside first so a crash in between
            // never leaves neither.
            let old = dir.join(format!(".step-{step}.old-{}", std::process::id()));
            std::fs::rename(&target, &old)
                .with_context(|| format!("cannot move {} aside", target.display()))?;
            std::fs::rename(&tmp, &target)
                .with_context(|| format!("cannot move {} into place", tmp.display()))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &target)
                .with_context(|| format!("cannot move {} into place", tmp.display()))?;
        }
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        self.prune_checkpoints()?;
        Ok(target)
    }

    fn prune_checkpoints(&self) -> Result<()> {
        if self.keep_checkpoints == 0 {
            return Ok(());
        }
        let mut steps = list_checkpoints(&self.checkpoints_dir());
        steps.sort_by_key(|(s, _)| *s);
        let excess = steps.len().saturating_sub(self.keep_checkpoints);
        for (_, path) in steps.into_iter().take(excess) {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove old checkpoint {}", path.display()))?;
        }
        Ok(())
    }

    /// The newest complete checkpoint, if any.
    pub fn latest_checkpoint(&self, device: &Device) -> Result<Option<Checkpoint>> {
        latest_checkpoint(&self.checkpoints_dir(), device)
    }

    /// Before a resumed script starts: set aside unreadable checkpoints (renamed
    /// `corrupt-step-<N>`, with a warning naming them) so the run continues from the newest
    /// intact one, and drop the `metrics.jsonl` rows logged after that checkpoint (appended to
    /// `metrics.discarded.jsonl`). Returns the step resumed from.
    pub fn prepare_resume(&self) -> Result<Option<i64>> {
        let dir = self.checkpoints_dir();
        let mut found = list_checkpoints(&dir);
        found.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
        for (step, path) in found {
            match read_checkpoint_meta(&path) {
                Ok(meta) => {
                    if let Some(bytes) = meta.get(METRICS_BYTES).and_then(|b| b.as_u64()) {
                        self.truncate_metrics(bytes, &format!("checkpoint step {step}"))?;
                    }
                    return Ok(Some(step));
                }
                Err(e) => {
                    let aside = (1..)
                        .map(|i| match i {
                            1 => dir.join(format!("corrupt-step-{step}")),
                            _ => dir.join(format!("corrupt-step-{step}-{i}")),
                        })
                        .find(|p| !p.exists())
                        .expect("an unused name exists");
                    std::fs::rename(&path, &aside).with_context(|| {
                        format!("cannot move corrupt checkpoint {} aside", path.display())
                    })?;
                    tracing::warn!(
                        "checkpoint {} is corrupt ({e:#}): moved to {}; falling back to the previous checkpoint",
                        path.display(),
                        aside.display()
                    );
                }
            }
        }
        // No checkpoint: the script starts over, and every row would be logged again.
        self.truncate_metrics(0, "the start (no intact checkpoint)")?;
        Ok(None)
    }

    // ---- end of run ------------------------------------------------------------------------

    /// Record how the run ended (`exit.json`); a run that ended with 0 is finished.
    pub fn write_exit(&self, code: i32) -> Result<()> {
        let record = serde_json::json!({"exit_code": code, "time": unix_time()});
        crate::fsutil::atomic_write(&self.path.join(EXIT_FILE), record.to_string().as_bytes())
    }

    /// Forget a previous ending (a resumed run is running again).
    pub fn clear_exit(&self) -> Result<()> {
        let path = self.path.join(EXIT_FILE);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// True when the run folder records a successful end.
    pub fn finished(&self) -> bool {
        std::fs::read_to_string(self.path.join(EXIT_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v["exit_code"] == 0)
    }

    // ---- metrics ---------------------------------------------------------------------------

    fn metrics_path(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    /// Bytes in `metrics.jsonl` now (0 when there is none).
    fn metrics_len(&self) -> u64 {
        let _guard = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::metadata(self.metrics_path()).map_or(0, |m| m.len())
    }

    /// Cut `metrics.jsonl` back to `bytes`, appending the rows cut to `metrics.discarded.jsonl`.
    fn truncate_metrics(&self, bytes: u64, since: &str) -> Result<()> {
        let _guard = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.metrics_path();
        let Ok(text) = std::fs::read(&path) else {
            return Ok(());
        };
        let Some(tail) = text.get(bytes as usize..).filter(|t| !t.is_empty()) else {
            return Ok(());
        };
        let rows = tail.iter().filter(|&&b| b == b'\n').count();
        let discarded = self.path.join("metrics.discarded.jsonl");
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&discarded)
            .and_then(|mut f| f.write_all(tail).and_then(|()| f.sync_data()))
            .with_context(|| format!("cannot write {}", discarded.display()))?;
        OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(bytes))
            .with_context(|| format!("cannot truncate {}", path.display()))?;
        tracing::info!(
            "{}: {rows} row(s) logged after {since} dropped (they are logged again; kept in {})",
            path.display(),
            discarded.display()
        );
        Ok(())
    }

    /// Append one JSON line to `metrics.jsonl` (with `time`). Returns the names of halting
    /// keys whose value is non-finite (the line is written all the same).
    pub fn log_metrics(
        &self,
        mut record: serde_json::Map<String, serde_json::Value>,
        nonfinite: &[String],
    ) -> Result<Vec<String>> {
        record.insert("time".into(), unix_time().into());
        let line = serde_json::to_string(&record)?;
        let _guard = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.metrics_path();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))?;
        let halting: Vec<String> = nonfinite
            .iter()
            .filter(|k| self.halt_on_nonfinite.iter().any(|h| h == *k))
            .cloned()
            .collect();
        if !halting.is_empty() {
            self.halted.store(true, Ordering::SeqCst);
        }
        Ok(halting)
    }
}

/// `(step, folder)` of every complete checkpoint under `dir`.
pub fn list_checkpoints(dir: &Path) -> Vec<(i64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: i64 = name.strip_prefix("step-")?.parse().ok()?;
            let p = e.path();
            (p.join("state.json").is_file() && p.join("tensors.safetensors").is_file())
                .then_some((step, p))
        })
        .collect()
}

/// The newest checkpoint under `dir` that loads; an unreadable newer one is skipped with a
/// warning naming it.
pub fn latest_checkpoint(dir: &Path, device: &Device) -> Result<Option<Checkpoint>> {
    let mut found = list_checkpoints(dir);
    found.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
    for (step, path) in found {
        match load_checkpoint(step, &path, device) {
            Ok(ck) => return Ok(Some(ck)),
            Err(e) => tracing::warn!(
                "checkpoint {} is corrupt ({e:#}); falling back to the previous checkpoint",
                path.display()
            ),
        }
    }
    Ok(None)
}

fn load_checkpoint(step: i64, path: &Path, device: &Device) -> Result<Checkpoint> {
    let meta = read_checkpoint_meta(path)?;
    let tensors = crate::tensor::io::load_safetensors(&path.join("tensors.safetensors"), device)?;
    let state = meta
        .get("state")
        .cloned()
        .unwrap_or(serde_json::Value::Object(Default::default()));
    Ok(Checkpoint {
        step,
        path: path.to_path_buf(),
        tensors,
        state,
    })
}

/// The parsed `state.json` of a checkpoint folder, after checking that its tensors file is
/// whole (a valid safetensors header whose offsets fit the file).
fn read_checkpoint_meta(path: &Path) -> Result<serde_json::Value> {
    let tensors_path = path.join("tensors.safetensors");
    let bytes = std::fs::read(&tensors_path)
        .with_context(|| format!("cannot read {}", tensors_path.display()))?;
    safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a whole safetensors file", tensors_path.display()))?;
    let state_path = path.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let meta: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", state_path.display()))?;
    if !meta.is_object() {
        bail!("{}: not a checkpoint record", state_path.display());
    }
    Ok(meta)
}

/// Remove what a process that died while saving a checkpoint left under `dir`: its
/// `.step-<N>.tmp-<pid>` folders (incomplete saves) and `.step-<N>.old-<pid>` folders (the
/// replaced save, put back when the replacement never arrived). Called with the run folder
/// locked, so no live process is writing them.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".step-") else {
            continue;
        };
        let path = entry.path();
        if let Some((step, _pid)) = rest.split_once(".old-") {
            let target = dir.join(format!("step-{step}"));
            if !target.exists() && std::fs::rename(&path, &target).is_ok() {
                tracing::warn!(
                    "restored checkpoint {} (a save replacing it was interrupted)",
                    target.display()
                );
                continue;
            }
        } else if !rest.contains(".tmp-") {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!("removed {} (left by an interrupted save)", path.display()),
            Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

pub fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_refuses_second_holder_and_checkpoints_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(dir.path()).unwrap();
        // Another open file description on the same lock file conflicts (flock semantics).
        let err = RunDir::open(dir.path()).err().unwrap();
        let locked = err.downcast_ref::<Locked>().unwrap();
        assert_eq!(locked.pid, Some(std::process::id()));
        assert!(RunDir::is_locked(dir.path()));
        let t = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        let mut m = HashMap::new();
        m.insert("x".to_string(), t);
        for step in 1..=5 {
            run.save_checkpoint(step, &m, &serde_json::json!({"k": step}))
                .unwrap();
        }
        let mut steps: Vec<i64> = list_checkpoints(&run.checkpoints_dir())
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        steps.sort();
        assert_eq!(steps, vec![3, 4, 5]);
        let latest = run.latest_checkpoint(&Device::Cpu).unwrap().unwrap();
        assert_eq!(latest.step, 5);
        assert_eq!(latest.state["k"], 5);
        drop(run);
        assert!(!RunDir::is_locked(dir.path()));
    }

    #[test]
    fn a_refused_contender_reads_the_pid_the_holder_is_still_writing() {
        let dir = tempfile::tempdir().unwrap();
        // A holder between taking the lock and writing its pid.
        let folder = File::open(dir.path()).unwrap();
        folder.lock().unwrap();
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.path().join("lock"))
            .unwrap();
        lock.try_lock().unwrap();
        let path = dir.path().to_path_buf();
        let contender = std::thread::spawn(move || RunDir::open(&path).err().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !contender.is_finished(),
            "the contender waits until the pid is written"
        );
        (&lock).write_all(b"4242").unwrap();
        drop(folder);
        let err = contender.join().unwrap();
        assert_eq!(err.downcast_ref::<Locked>().unwrap().pid, Some(4242));
    }

    #[test]
    fn latest_checkpoint_skips_a_corrupt_newest_one() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(dir.path()).unwrap();
        let mut m = HashMap::new();
        m.insert(
            "x".to_string(),
            Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap(),
        );
        run.save_checkpoint(1, &m, &serde_json::json!({})).unwrap();
        let newest = run.save_checkpoint(2, &m, &serde_json::json!({})).unwrap();
        std::fs::write(newest.join("tensors.safetensors"), b"garbage").unwrap();
        assert_eq!(
            run.latest_checkpoint(&Device::Cpu).unwrap().unwrap().step,
            1
        );
        std::fs::write(newest.join("state.json"), b"{").unwrap();
        assert_eq!(run.prepare_resume().unwrap(), Some(1));
        assert!(run.checkpoints_dir().join("corrupt-step-2").is_dir());
    }

    #[test]
    fn an_interrupted_replacement_puts_the_old_checkpoint_back() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = dir.path().join("checkpoints");
        // Killed between moving step-5 aside and moving its replacement in.
        std::fs::create_dir_all(checkpoints.join(".step-5.old-4000000")).unwrap();
        std::fs::create_dir_all(checkpoints.join(".step-5.tmp-4000000")).unwrap();
        std::fs::create_dir_all(checkpoints.join(".step-3.old-4000001")).unwrap();
        std::fs::create_dir_all(checkpoints.join("step-3")).unwrap();
        let _run = RunDir::open(dir.path()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&checkpoints)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["step-3", "step-5"]);
    }
}
