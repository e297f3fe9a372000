//! One `#[export_module]` per area; each is a thin adapter over the core.

use rhai::{exported_module, Engine};

pub mod io;
pub mod rng;
pub mod system;
pub mod tensor;
pub mod text;
pub mod vae;

pub fn register_all(engine: &mut Engine) {
    engine.register_type_with_name::<candle_core::Tensor>("Tensor");
    engine.register_type_with_name::<rng::ScriptRng>("Rng");
    engine.register_global_module(exported_module!(tensor::tensor_api).into());
    engine.register_global_module(exported_module!(rng::rng_api).into());
    engine.register_global_module(exported_module!(io::io_api).into());
    engine.register_global_module(exported_module!(system::system_api).into());
    engine.register_type_with_name::<text::Tokenizer>("Tokenizer");
    engine.register_type_with_name::<text::TextEncoder>("TextEncoder");
    engine.register_type_with_name::<vae::Vae>("Vae");
    engine.register_global_module(exported_module!(text::text_api).into());
    engine.register_global_module(exported_module!(vae::vae_api).into());
}
