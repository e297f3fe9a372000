//! Run folders: one per headless run, locked by the process writing it.
//!
//! Layout of `runs/<stem>-<YYYYmmdd-HHMMSS>/`:
//! `script.rhai` (a copy of the script), `params.json` (params, seed, device, limits),
//! `run.log`, `metrics.jsonl`, `checkpoints/step-<N>/{tensors.safetensors,state.json}`,
//! `lock` (pid of the holder; an OS lock that dies with the process) and whatever the script
//! writes under `run_dir()`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::control::StopReason;

/// Exit code of `lpo run` when the run folder is locked by another live process (EX_TEMPFAIL).
pub const EXIT_LOCKED: i32 = 75;

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

    // ---- metrics ---------------------------------------------------------------------------

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
        let path = self.path.join("metrics.jsonl");
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

pub fn latest_checkpoint(dir: &Path, device: &Device) -> Result<Option<Checkpoint>> {
    let Some((step, path)) = list_checkpoints(dir).into_iter().max_by_key(|(s, _)| *s) else {
        return Ok(None);
    };
    let tensors = crate::tensor::io::load_safetensors(&path.join("tensors.safetensors"), device)?;
    let state_path = path.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let meta: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", state_path.display()))?;
    let state = meta
        .get("state")
        .cloned()
        .unwrap_or(serde_json::Value::Object(Default::default()));
    Ok(Some(Checkpoint {
        step,
        path,
        tensors,
        state,
    }))
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
}
