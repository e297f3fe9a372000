//! The one place an [`Engine`] is built: limits, print/debug routed to tracing, cancellation,
//! module resolution and every binding module.

use std::path::PathBuf;
use std::sync::Arc;

use rhai::{Dynamic, Engine, EvalAltResult, Module, ModuleResolver, Position, Shared};
type SharedModule = Shared<Module>;

use super::bindings;
use super::host::Host;
use super::resolver::StdlibResolver;

/// Safety limits. Generous by default: a training run legitimately executes billions of
/// script operations, so operations are unlimited unless asked for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// 0 = unlimited.
    pub max_operations: u64,
    pub max_call_levels: usize,
    pub max_expr_depth: usize,
    pub max_string_size: usize,
    pub max_array_size: usize,
    pub max_map_size: usize,
    /// The most bytes one tensor built from a script-given shape may take.
    pub max_tensor_memory: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_operations: 0,
            max_call_levels: 128,
            max_expr_depth: 256,
            max_string_size: 64 << 20,
            max_array_size: 10_000_000,
            max_map_size: 1_000_000,
            max_tensor_memory: crate::tensor::memory::default_cap(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub limits: Limits,
    /// Searched first for bare-name imports (default `./stdlib`).
    pub stdlib_dir: PathBuf,
    /// Folder of the running script, for script-relative imports.
    pub script_dir: Option<PathBuf>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            stdlib_dir: PathBuf::from("stdlib"),
            script_dir: None,
        }
    }
}

pub struct ScriptEngine {
    pub engine: Engine,
    pub host: Host,
    pub resolver: Arc<StdlibResolver>,
}

struct SharedResolver(Arc<StdlibResolver>);

impl ModuleResolver for SharedResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        self.0.resolve(engine, source, path, pos)
    }
}

/// Build an engine for `host` with every binding registered.
pub fn build_engine(mut host: Host, options: &EngineOptions) -> ScriptEngine {
    let mut engine = Engine::new();
    let limits = &options.limits;
    host.max_tensor_bytes = limits.max_tensor_memory;
    engine
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_levels)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth / 2)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_map_size);

    engine.on_print(|text| tracing::info!(target: "script", "{text}"));
    engine.on_debug(|text, source, pos| {
        tracing::debug!(target: "script", "{}{pos:?}: {text}", source.map(|s| format!("{s} ")).unwrap_or_default())
    });

    let control = host.control.clone();
    engine.on_progress(move |ops| {
        // Every operation: one script call level can take tens of KiB of native stack.
        if super::stack::exhausted() {
            return Some(Dynamic::from(super::stack::StackExhausted));
        }
        if ops % 128 != 0 {
            return None;
        }
        control
            .stop_reason()
            .map(|reason| Dynamic::from(reason.describe().to_string()))
    });

    let resolver = Arc::new(StdlibResolver::new(
        options.stdlib_dir.clone(),
        options.script_dir.clone(),
    ));
    engine.set_module_resolver(SharedResolver(resolver.clone()));
    engine.set_default_tag(host.clone().into_dynamic());
    bindings::register_all(&mut engine);

    ScriptEngine {
        engine,
        host,
        resolver,
    }
}
