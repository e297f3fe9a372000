//! One `#[export_module]` per area; each is a thin adapter over the core.

use rhai::{exported_module, Engine};

pub mod diffusion;
pub mod eval;
pub mod io;
pub mod loss;
pub mod lpo;
pub mod lrm;
pub mod lrm_data;
pub mod params;
pub mod prompts;
pub mod rng;
pub mod run;
pub mod shapes;
pub mod shapes_pipe;
pub mod system;
pub mod tensor;
pub mod text;
pub mod train;
pub mod unet;
pub mod vae;

pub fn register_all(engine: &mut Engine) {
    engine.register_type_with_name::<candle_core::Tensor>("Tensor");
    engine.register_type_with_name::<rng::ScriptRng>("Rng");
    engine.register_type_with_name::<unet::ScriptUNet>("UNet");
    engine.register_type_with_name::<run::Progress>("Progress");
    engine.register_type_with_name::<shapes::ScriptWorld>("ShapesWorld");
    engine.register_global_module(exported_module!(tensor::tensor_api).into());
    engine.register_global_module(exported_module!(rng::rng_api).into());
    engine.register_global_module(exported_module!(io::io_api).into());
    engine.register_global_module(exported_module!(prompts::prompts_api).into());
    engine.register_global_module(exported_module!(params::params_api).into());
    engine.register_global_module(exported_module!(system::system_api).into());
    engine.register_global_module(exported_module!(unet::unet_api).into());
    engine.register_type_with_name::<text::Tokenizer>("Tokenizer");
    engine.register_type_with_name::<text::TextEncoder>("TextEncoder");
    engine.register_type_with_name::<vae::Vae>("Vae");
    engine.register_global_module(exported_module!(text::text_api).into());
    engine.register_global_module(exported_module!(vae::vae_api).into());
    engine.register_type_with_name::<diffusion::Scheduler>("Scheduler");
    engine.register_global_module(exported_module!(diffusion::diffusion_api).into());
    engine.register_global_module(exported_module!(loss::loss_api).into());
    engine.register_type_with_name::<crate::train::Params>("Params");
    engine.register_type_with_name::<train::ScriptOptimizer>("AdamW");
    engine.register_global_module(exported_module!(train::train_api).into());
    engine.register_global_module(exported_module!(run::run_api).into());
    engine.register_global_module(exported_module!(shapes::shapes_api).into());
    engine.register_global_module(exported_module!(eval::eval_api).into());
    engine.register_type_with_name::<lrm::ScriptLrm>("Lrm");
    engine.register_global_module(exported_module!(lrm::lrm_api).into());
    engine.register_type_with_name::<lpo::ScriptPolicy>("LpoPolicy");
    engine.register_type_with_name::<lpo::Records>("Records");
    engine.register_global_module(exported_module!(lpo::lpo_api).into());
    engine.register_type_with_name::<lrm_data::ScriptPreferences>("Preferences");
    engine.register_global_module(exported_module!(lrm_data::lrm_data_api).into());
    engine.register_global_module(exported_module!(shapes_pipe::shapes_pipe_api).into());
}
