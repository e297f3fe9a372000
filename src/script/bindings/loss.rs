//! LPO's step loss in scripts:
//! `let out = lpo_loss(lp_w, lp_w_ref, lp_l, lp_l_ref, #{beta: 500, eps: 0.1});`
//! `out.loss` is the differentiable scalar; the rest are detached statistics.

use rhai::plugin::*;

mod helpers {
    use rhai::{Dynamic, Map};

    use crate::lpo::LpoLossOutput;

    pub(super) fn to_map(out: LpoLossOutput) -> Map {
        let mut m = Map::new();
        m.insert("loss".into(), Dynamic::from(out.loss));
        m.insert("loss_per_pair".into(), Dynamic::from(out.loss_per_pair));
        m.insert("implicit_acc".into(), Dynamic::from(out.implicit_acc));
        m.insert("margin".into(), Dynamic::from(out.margin));
        m.insert("ratio_w".into(), Dynamic::from(out.ratio_w));
        m.insert("ratio_l".into(), Dynamic::from(out.ratio_l));
        m.insert("logits".into(), Dynamic::from(out.logits));
        m
    }
}

#[export_module]
pub mod loss_api {
    use super::helpers::*;
    use candle_core::Tensor;
    use rhai::Map;

    use crate::lpo::{lpo_loss as core_lpo_loss, LpoLossConfig};
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Options;

    /// LPO step loss over B pairs: r = clamp(exp(lp - lp_ref), 1-eps, 1+eps), loss =
    /// mean(softplus(-(beta log r_w - beta log r_l))). Options `beta` (default 500), `eps`
    /// (default 0.1). Returns `#{loss, loss_per_pair, implicit_acc, margin, ratio_w, ratio_l,
    /// logits}` (tensors; `loss` is differentiable w.r.t. lp_w and lp_l).
    #[rhai_fn(return_raw)]
    pub fn lpo_loss(
        ctx: NativeCallContext,
        lp_w: Tensor,
        lp_w_ref: Tensor,
        lp_l: Tensor,
        lp_l_ref: Tensor,
        opts: Map,
    ) -> ScriptResult<Map> {
        let o = Options::new(&opts, "lpo_loss", &["beta", "eps"]).or_script(&ctx)?;
        let d = LpoLossConfig::default();
        let cfg = LpoLossConfig {
            beta: o.f64("beta", d.beta).or_script(&ctx)?,
            eps: o.f64("eps", d.eps).or_script(&ctx)?,
        };
        core_lpo_loss(&lp_w, &lp_w_ref, &lp_l, &lp_l_ref, cfg)
            .map(to_map)
            .or_script(&ctx)
    }

    /// `lpo_loss` with the paper's beta 500 and eps 0.1.
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
