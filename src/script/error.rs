//! Host errors as catchable Rhai runtime errors that carry the script position of the call,
//! and the mapping from a script's failure to the command line's exit codes.

use std::fmt::Display;

use rhai::{EvalAltResult, NativeCallContext, Position};

use crate::runtime::control::{RunControl, StopReason, Stopped};

pub type ScriptResult<T> = Result<T, Box<EvalAltResult>>;

/// A runtime error at the position of the host call (namespaced calls lose it otherwise).
pub fn host_error(ctx: &NativeCallContext, err: impl Display) -> Box<EvalAltResult> {
    error_at(ctx.call_position(), err)
}

pub fn error_at(pos: Position, err: impl Display) -> Box<EvalAltResult> {
    EvalAltResult::ErrorRuntime(without_backtrace(format!("{err:#}")).into(), pos).into()
}

/// candle appends a captured backtrace to its errors when RUST_BACKTRACE is set; a script
/// error message is for the script's author, so it is cut at the first backtrace frame.
pub fn without_backtrace(mut msg: String) -> String {
    let mut offset = 0;
    for line in msg.split_inclusive('\n') {
        if offset > 0 && line.trim_start().starts_with("0: ") {
            msg.truncate(offset);
            let trimmed = msg.trim_end().len();
            msg.truncate(trimmed);
            return msg;
        }
        offset += line.len();
    }
    msg
}

/// A stop request observed inside a host call: the same error `on_progress` raises.
pub fn stopped_error(ctx: &NativeCallContext, stopped: Stopped) -> Box<EvalAltResult> {
    EvalAltResult::ErrorTerminated(stopped.0.describe().into(), ctx.call_position()).into()
}

/// `result.or_script(&ctx)?` turns any displayable error into a positioned script error;
/// a [`Stopped`] anywhere in an anyhow chain becomes a termination, not a runtime error.
pub trait OrScriptError<T> {
    fn or_script(self, ctx: &NativeCallContext) -> ScriptResult<T>;
}

impl<T, E: Display + 'static> OrScriptError<T> for Result<T, E> {
    fn or_script(self, ctx: &NativeCallContext) -> ScriptResult<T> {
        self.map_err(|e| {
            let any: &dyn std::any::Any = &e;
            if let Some(stopped) = any.downcast_ref::<Stopped>() {
                return stopped_error(ctx, *stopped);
            }
            if let Some(err) = any.downcast_ref::<anyhow::Error>() {
                if let Some(stopped) = err.downcast_ref::<Stopped>() {
                    return stopped_error(ctx, *stopped);
                }
            }
            host_error(ctx, e)
        })
    }
}

/// What the command line reports for a failed script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Runtime,
    SafetyLimit,
    Parse,
    NotFound,
    Stopped(StopReason),
}

impl Failure {
    pub fn exit_code(self) -> i32 {
        match self {
            Failure::Runtime => 1,
            Failure::SafetyLimit => 3,
            Failure::Parse => 65,
            Failure::NotFound => 66,
            Failure::Stopped(reason) => reason.exit_code(),
        }
    }
}

/// Classify an evaluation error; a termination takes its reason from the run control.
pub fn classify(err: &EvalAltResult, control: &RunControl) -> Failure {
    match err {
        EvalAltResult::ErrorParsing(..) => Failure::Parse,
        EvalAltResult::ErrorModuleNotFound(..) => Failure::NotFound,
        EvalAltResult::ErrorInModule(_, inner, _)
        | EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => classify(inner, control),
        EvalAltResult::ErrorTooManyOperations(..)
        | EvalAltResult::ErrorStackOverflow(..)
        | EvalAltResult::ErrorDataTooLarge(..)
        | EvalAltResult::ErrorTooManyModules(..)
        | EvalAltResult::ErrorTooManyVariables(..) => Failure::SafetyLimit,
        EvalAltResult::ErrorTerminated(token, _)
            if token.is::<crate::script::stack::StackExhausted>() =>
        {
            Failure::SafetyLimit
        }
        EvalAltResult::ErrorTerminated(..) => {
            Failure::Stopped(control.stop_reason().unwrap_or(StopReason::Interrupt))
        }
        _ => Failure::Runtime,
    }
}
