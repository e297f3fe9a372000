//! Signals during `lpo run`: SIGINT/SIGTERM ask the script to stop at its next safe point.
//!
//! A script that polls `should_stop()` is cooperative: a signal then only makes `should_stop()`
//! true, host calls go on, and the script checkpoints and returns; the run control is forced
//! after a grace period (or at a second signal). A script that never polls is stopped at once
//! (at its next operation or host-call check).

use std::sync::Arc;
use std::time::Duration;

use crate::runtime::control::{RunControl, StopReason};

use super::run_dir::RunDir;

pub fn install(control: Arc<RunControl>, run: Arc<RunDir>, grace: Duration) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("lpo-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let reason = if signal == SIGTERM {
                    StopReason::Terminate
                } else {
                    StopReason::Interrupt
                };
                let pending = run.soft_stop().is_some() || control.should_stop();
                if pending {
                    if reason == StopReason::Interrupt {
                        super::log::report("second interrupt: exiting now");
                        std::process::exit(130);
                    }
                    control.request_stop(reason);
                    continue;
                }
                if run.is_cooperative() {
                    run.request_soft_stop(reason);
                    tracing::warn!(
                        "{}: the script stops at its next should_stop() check (forced in {:.0} s)",
                        reason.describe(),
                        grace.as_secs_f64()
                    );
                    let control = control.clone();
                    let _ = std::thread::Builder::new()
                        .name("lpo-grace".into())
                        .spawn(move || {
                            std::thread::sleep(grace);
                            control.request_stop(reason);
                        });
                } else {
                    tracing::warn!("{}: stopping", reason.describe());
                    control.request_stop(reason);
                }
            }
        })?;
    Ok(())
}
