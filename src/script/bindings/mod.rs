//! One `#[export_module]` per area; each is a thin adapter over the core.

use rhai::{exported_module, Engine};

pub mod diffusion;
pub mod io;
pub mod loss;
pub mod rng;
pub mod system;
pub mod tensor;

pub fn register_all(engine: &mut Engine) {
    engine.register_type_with_name::<candle_core::Tensor>("Tensor");
    engine.register_type_with_name::<rng::ScriptRng>("Rng");
    engine.register_global_module(exported_module!(tensor::tensor_api).into());
    engine.register_global_module(exported_module!(rng::rng_api).into());
    engine.register_global_module(exported_module!(io::io_api).into());
    engine.register_global_module(exported_module!(system::system_api).into());
    engine.register_type_with_name::<diffusion::Scheduler>("Scheduler");
    engine.register_global_module(exported_module!(diffusion::diffusion_api).into());
    engine.register_global_module(exported_module!(loss::loss_api).into());
}
