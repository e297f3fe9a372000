//! Declared parameters in scripts: `check_params(PARAMS, params)` (see `crate::script::params`).

use rhai::plugin::*;
use rhai::Map;

use crate::script::error::{OrScriptError, ScriptResult};
use crate::script::params::Declaration;

#[export_module]
pub mod params_api {
    use rhai::Map;

    use super::checked;
    use crate::script::error::ScriptResult;

    /// `values` (a recipe's `params`) checked against the declaration `spec` and returned with
    /// every default filled in. `spec` maps each name to `#{value, doc}` (the default value and
    /// what it means) plus optional `type` ("int", "float" (ints too), "bool", "string", "path",
    /// "array", "map", "any", an object type such as "Vae", or several joined by `|`; default:
    /// the default value's type; a `()` default always allows `()`), `min` / `max` (inclusive)
    /// and `choices`. An error names every unknown key (with the accepted ones), wrong type and
    /// out-of-range value. A recipe declares `const PARAMS = #{...}` (literals only) so that
    /// `lpo run` checks `--set` before the run starts and `lpo run SCRIPT --help` lists it.
    #[rhai_fn(return_raw)]
    pub fn check_params(ctx: NativeCallContext, spec: Map, values: Map) -> ScriptResult<Map> {
        checked(&ctx, &spec, &values, "params")
    }

    /// `check_params(spec, values)` whose errors start with `who` (e.g. a library's name, for
    /// its options map).
    #[rhai_fn(name = "check_params", return_raw)]
    pub fn check_params_of(
        ctx: NativeCallContext,
        spec: Map,
        values: Map,
        who: &str,
    ) -> ScriptResult<Map> {
        checked(&ctx, &spec, &values, who)
    }
}

fn checked(ctx: &NativeCallContext, spec: &Map, values: &Map, who: &str) -> ScriptResult<Map> {
    let type_of = |v: &rhai::Dynamic| ctx.engine().map_type_name(v.type_name()).to_string();
    let declaration = Declaration::from_map(spec, &type_of)
        .map_err(|e| format!("{who}: {e}"))
        .or_script(ctx)?;
    let problems = declaration.problems(values, &type_of);
    if !problems.is_empty() {
        return Err(format!(
            "{who}: {}; accepted: {}",
            problems.join("; "),
            declaration.names().join(", ")
        ))
        .or_script(ctx);
    }
    Ok(declaration.with_defaults(values))
}
