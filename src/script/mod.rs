//! The Rhai side: the engine, its host context, errors, declared option maps, module resolution and
//! one binding module per area of the core.

pub mod bindings;
pub mod convert;
pub mod declared;
pub mod docs;
pub mod engine;
pub mod error;
pub mod host;
pub mod params;
pub mod resolver;
pub mod stack;
pub mod suggest;

pub use engine::{build_engine, EngineOptions, Limits, ScriptEngine};
pub use error::{classify, host_error, Failure, OrScriptError, ScriptResult};
pub use host::Host;
