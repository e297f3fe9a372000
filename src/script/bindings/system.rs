//! The session: device, seed, run control.

use rhai::plugin::*;

#[export_module]
pub mod system_api {
    use crate::script::Host;
    use crate::tensor::device::device_name;

    /// The device this run computes on (`--device`): "cpu" or "cuda:N".
    #[rhai_fn(volatile)]
    pub fn device(ctx: NativeCallContext) -> String {
        device_name(&Host::of(&ctx).device)
    }

    /// The run's seed (`--seed`, default 0).
    #[rhai_fn(volatile)]
    pub fn default_seed(ctx: NativeCallContext) -> i64 {
        Host::of(&ctx).seed as i64
    }

    /// Seconds since the Unix epoch, as a float (for timing).
    #[rhai_fn(volatile)]
    pub fn now() -> f64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}
