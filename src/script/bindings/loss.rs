//! LPO's step loss in scripts:
//! `let out = lpo_loss(lp_w, lp_w_ref, lp_l, lp_l_ref, #{beta: 500, eps: 0.1});`
//! `out.loss` is the differentiable scalar; the rest are detached statistics.

use rhai::plugin::*;

use crate::lpo::LpoLossConfig;
use crate::script::declared::{option_docs, OptionDoc};

/// The options of this module's functions, for `lpo fns`.
pub fn declared_options() -> Vec<(&'static str, Vec<OptionDoc>)> {
    vec![("lpo_loss", option_docs::<LpoLossConfig>())]
}

mod helpers {
    use rhai::{Dynamic, Map};

    use crate::lpo::LpoLossOutput;

    pub(super) fn to_map(out: LpoLossOutput) -> Map {
        [
            ("loss", out.loss),
            ("loss_per_pair", out.loss_per_pair),
            ("implicit_acc", out.implicit_acc),
            ("margin", out.margin),
            ("ratio_w", out.ratio_w),
            ("ratio_l", out.ratio_l),
            ("logits", out.logits),
        ]
        .into_iter()
        .map(|(k, t)| (k.into(), Dynamic::from(t)))
        .collect()
    }
}

#[export_module]
pub mod loss_api {
    use super::helpers::*;
    use candle_core::Tensor;
    use rhai::Map;

    use crate::lpo::{lpo_loss as core_lpo_loss, LpoLossConfig};
    use crate::script::declared::from_map;
    use crate::script::error::{OrScriptError, ScriptResult};

    /// LPO step loss over B pairs: r = clamp(exp(lp - lp_ref), 1-eps, 1+eps), loss =
    /// mean(softplus(-(beta log r_w - beta log r_l))). Options `beta`, `eps`. Returns
    /// `#{loss, loss_per_pair, implicit_acc, margin, ratio_w, ratio_l, logits}` (tensors;
    /// `loss` is differentiable w.r.t. lp_w and lp_l).
    #[rhai_fn(return_raw)]
    pub fn lpo_loss(
        ctx: NativeCallContext,
        lp_w: Tensor,
        lp_w_ref: Tensor,
        lp_l: Tensor,
        lp_l_ref: Tensor,
        opts: Map,
    ) -> ScriptResult<Map> {
        let cfg: LpoLossConfig = from_map(&opts, "lpo_loss").or_script(&ctx)?;
        core_lpo_loss(&lp_w, &lp_w_ref, &lp_l, &lp_l_ref, cfg)
            .map(to_map)
            .or_script(&ctx)
    }

    /// `lpo_loss` with the default options (the paper's beta and eps).
    #[rhai_fn(name = "lpo_loss", return_raw)]
    pub fn lpo_loss_default(
        ctx: NativeCallContext,
        lp_w: Tensor,
        lp_w_ref: Tensor,
        lp_l: Tensor,
        lp_l_ref: Tensor,
    ) -> ScriptResult<Map> {
        core_lpo_loss(&lp_w, &lp_w_ref, &lp_l, &lp_l_ref, LpoLossConfig::default())
            .map(to_map)
            .or_script(&ctx)
    }
}
