//! What host calls need from the running session: the run control, the device and the seed.
//! It travels as the engine's tag, so plugin functions reach it through their call context.

use std::sync::Arc;

use candle_core::Device;
use rhai::{Dynamic, NativeCallContext};

use crate::control::{RunControl, Stopped};

#[derive(Clone)]
pub struct Host {
    pub control: Arc<RunControl>,
    pub device: Device,
    pub seed: u64,
    /// The run folder of `lpo run` (None in the REPL and in bare engines).
    pub run: Option<Arc<crate::run::dir::RunDir>>,
}

impl Host {
    pub fn new(control: Arc<RunControl>, device: Device, seed: u64) -> Self {
        Self {
            control,
            device,
            seed,
            run: None,
        }
    }

    /// The same host writing into `run` (checkpoints, metrics, `run_dir()`).
    pub fn with_run_dir(mut self, run: Arc<crate::run::dir::RunDir>) -> Self {
        self.run = Some(run);
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

    pub fn into_dynamic(self) -> Dynamic {
        Dynamic::from(self)
    }
}
