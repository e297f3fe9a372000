//! What host calls need from the running session: the run control, the device, the seed, the
//! files the script may touch and the memory cap on one tensor. It travels as the engine's tag,
//! so plugin functions reach it through their call context.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use rhai::{Dynamic, NativeCallContext};

use crate::runtime::confinement::{AccessDenied, Confinement};
use crate::runtime::control::{RunControl, Stopped};

#[derive(Clone)]
pub struct Host {
    pub control: Arc<RunControl>,
    pub device: Device,
    pub seed: u64,
    /// The run folder of `lpo run` (None in the REPL and in bare engines).
    pub run: Option<Arc<crate::runtime::run_dir::RunDir>>,
    /// Which files scripts may read and write (unconfined unless set).
    pub files: Arc<Confinement>,
    /// The most bytes one tensor built from a script-given shape may take (`--max-tensor-memory`).
    pub max_tensor_bytes: u64,
}

impl Host {
    pub fn new(control: Arc<RunControl>, device: Device, seed: u64) -> Self {
        Self {
            control,
            device,
            seed,
            run: None,
            files: Arc::new(Confinement::unconfined()),
            max_tensor_bytes: crate::tensor::memory::default_cap(),
        }
    }

    /// The same host writing into `run` (checkpoints, metrics, `run_dir()`).
    pub fn with_run_dir(mut self, run: Arc<crate::runtime::run_dir::RunDir>) -> Self {
        self.run = Some(run);
        self
    }

    /// The same host confined to `files`.
    pub fn with_confinement(mut self, files: Confinement) -> Self {
        self.files = Arc::new(files);
        self
    }

    /// The host of the engine that made this call (a CPU default when none was set, e.g. in
    /// a bare engine built by a test).
    pub fn of(ctx: &NativeCallContext) -> Host {
        ctx.tag()
            .and_then(|tag| tag.clone().try_cast::<Host>())
            .unwrap_or_else(|| Host::new(RunControl::new(), Device::Cpu, 0))
    }

    pub fn check(&self) -> Result<(), Stopped> {
        self.control.check()
    }

    /// The gate of every host function that reads a file or folder a script names.
    pub fn readable(&self, path: &str) -> Result<PathBuf, AccessDenied> {
        self.files.check_read(Path::new(path))?;
        Ok(PathBuf::from(path))
    }

    /// The gate of every host function that writes a file or folder a script names.
    pub fn writable(&self, path: &str) -> Result<PathBuf, AccessDenied> {
        self.files.check_write(Path::new(path))?;
        Ok(PathBuf::from(path))
    }

    /// The text of a file the script may read.
    pub fn read_text(&self, path: &str) -> Result<String, String> {
        let file = self.readable(path).map_err(|e| e.to_string())?;
        std::fs::read_to_string(file).map_err(|e| format!("cannot read {path}: {e}"))
    }

    /// An error when a tensor of `dims` would exceed `--max-tensor-memory` (checked before a
    /// script-given shape is allocated; `what` names the operation).
    pub fn check_tensor_size(
        &self,
        what: &str,
        dims: &[usize],
        dtype: DType,
    ) -> Result<(), String> {
        crate::tensor::memory::check_tensor_size(what, dims, dtype, self.max_tensor_bytes)
    }

    pub fn into_dynamic(self) -> Dynamic {
        Dynamic::from(self)
    }
}
