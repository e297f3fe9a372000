//! One `#[export_module]` per area; each is a thin adapter over the core.

use rhai::{exported_module, Engine};

pub mod eval;
pub mod io;
pub mod rng;
pub mod shapes;
pub mod system;
pub mod tensor;

pub fn register_all(engine: &mut Engine) {
    engine.register_type_with_name::<candle_core::Tensor>("Tensor");
    engine.register_type_with_name::<rng::ScriptRng>("Rng");
    engine.register_type_with_name::<shapes::ScriptWorld>("ShapesWorld");
    engine.register_global_module(exported_module!(tensor::tensor_api).into());
    engine.register_global_module(exported_module!(rng::rng_api).into());
    engine.register_global_module(exported_module!(io::io_api).into());
    engine.register_global_module(exported_module!(system::system_api).into());
    engine.register_global_module(exported_module!(shapes::shapes_api).into());
    engine.register_global_module(exported_module!(eval::eval_api).into());
}
