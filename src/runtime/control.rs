//! Run control: the one flag that asks a running script (and every long host call) to stop.
//!
//! Signals, deadlines and the REPL's Ctrl-C all end up here; the script engine polls it from
//! `on_progress`, and core loops (sampling, training) poll it between steps.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a run was asked to stop. Each maps to the exit code of the command line contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT / Ctrl-C.
    Interrupt,
    /// SIGTERM (cluster preemption, systemd stop).
    Terminate,
    /// The `--timeout` deadline passed.
    Deadline,
}

impl StopReason {
    pub fn exit_code(self) -> i32 {
        match self {
            StopReason::Interrupt => 130,
            StopReason::Terminate => 143,
            StopReason::Deadline => 124,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            StopReason::Interrupt => "interrupted (SIGINT)",
            StopReason::Terminate => "terminated (SIGTERM)",
            StopReason::Deadline => "deadline reached (--timeout)",
        }
    }

    fn code(self) -> u8 {
        match self {
            StopReason::Interrupt => 1,
            StopReason::Terminate => 2,
            StopReason::Deadline => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(StopReason::Interrupt),
            2 => Some(StopReason::Terminate),
            3 => Some(StopReason::Deadline),
            _ => None,
        }
    }
}

/// The error a long host call returns when it notices a stop request.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("run stopped: {}", .0.describe())]
pub struct Stopped(pub StopReason);

#[derive(Debug, Default)]
pub struct RunControl {
    reason: AtomicU8,
    deadline: Mutex<Option<Instant>>,
}

impl RunControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Ask the run to stop. The first reason wins, so a deadline is not masked by a later signal.
    pub fn request_stop(&self, reason: StopReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason.code(), Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn set_timeout(&self, timeout: Duration) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + timeout);
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        if let Some(reason) = StopReason::from_code(self.reason.load(Ordering::SeqCst)) {
            return Some(reason);
        }
        let deadline = *self.deadline.lock().unwrap_or_else(|e| e.into_inner());
        if deadline.is_some_and(|d| Instant::now() >= d) {
            self.request_stop(StopReason::Deadline);
            return Some(StopReason::Deadline);
        }
        None
    }

    pub fn should_stop(&self) -> bool {
        self.stop_reason().is_some()
    }

    /// Err when a stop was requested: long loops call this between steps.
    pub fn check(&self) -> Result<(), Stopped> {
        match self.stop_reason() {
            Some(reason) => Err(Stopped(reason)),
            None => Ok(()),
        }
    }

    /// Clear a stop request (the REPL keeps its session after Ctrl-C).
    pub fn reset(&self) {
        self.reason.store(0, Ordering::SeqCst);
    }

    /// Clear the deadline as well as any stop request.
    pub fn reset_all(&self) {
        self.reset();
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Route SIGINT and SIGTERM to `control` from a background thread: each one asks the work in
/// progress to stop and nothing more (the REPL keeps its session however often Ctrl-C is
/// pressed). `lpo run` has its own handler with safe points and a grace period (run::signals).
pub fn install_signal_handlers(control: Arc<RunControl>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("lpo-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                control.request_stop(if signal == SIGTERM {
                    StopReason::Terminate
                } else {
                    StopReason::Interrupt
                });
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_reset_clears() {
        let control = RunControl::new();
        assert!(control.check().is_ok());
        control.request_stop(StopReason::Terminate);
        control.request_stop(StopReason::Interrupt);
        assert_eq!(control.stop_reason(), Some(StopReason::Terminate));
        assert_eq!(control.stop_reason().unwrap().exit_code(), 143);
        control.reset();
        assert!(!control.should_stop());
    }

    #[test]
    fn deadline_trips() {
        let control = RunControl::new();
        control.set_timeout(Duration::from_millis(0));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(control.stop_reason(), Some(StopReason::Deadline));
    }
}
