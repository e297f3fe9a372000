//! One `#[export_module]` per area; each is a thin adapter over the core.

use rhai::{exported_module, Engine};

use crate::script::declared::OptionDoc;

pub mod diffusion;
pub mod eval;
pub mod io;
pub mod loss;
pub mod lrm;
pub mod lrm_data;
pub mod optim;
pub mod params;
pub mod policy;
pub mod prompts;
pub mod records;
pub mod rng;
pub mod run;
pub mod sampling;
pub mod scorers;
pub mod shapes;
pub mod shapes_pipe;
pub mod system;
pub mod tensor;
pub mod text;
pub mod training;
pub mod unet;
pub mod vae;

/// Every host type scripts see, with the name they see it by; `lpo fns` and docs/API.md show
/// signatures in these names too.
macro_rules! script_types {
    ($($ty:path => $name:literal),* $(,)?) => {
        fn register_types(engine: &mut Engine) {
            $(engine.register_type_with_name::<$ty>($name);)*
        }

        /// (the type as bindings write it, its script name)
        pub fn script_type_names() -> Vec<(&'static str, &'static str)> {
            vec![$((last_segment(stringify!($ty)), $name)),*]
        }
    };
}

fn last_segment(path: &'static str) -> &'static str {
    path.rsplit("::").next().unwrap_or(path).trim()
}

script_types! {
    candle_core::Tensor => "Tensor",
    rng::ScriptRng => "Rng",
    unet::ScriptUNet => "UNet",
    run::Progress => "Progress",
    shapes::ScriptWorld => "ShapesWorld",
    text::Tokenizer => "Tokenizer",
    text::TextEncoder => "TextEncoder",
    vae::Vae => "Vae",
    diffusion::Scheduler => "Scheduler",
    crate::optim::Params => "Params",
    optim::ScriptOptimizer => "AdamW",
    scorers::ScriptScorer => "Scorer",
    lrm::ScriptLrm => "Lrm",
    policy::ScriptPolicy => "LpoPolicy",
    records::Records => "Records",
    lrm_data::ScriptPreferences => "Preferences",
}

/// The declared options of every script function that takes an option map.
pub fn declared_options() -> Vec<(&'static str, Vec<OptionDoc>)> {
    [
        policy::declared_options(),
        sampling::declared_options(),
        training::declared_options(),
        optim::declared_options(),
        lrm::declared_options(),
        lrm_data::declared_options(),
        loss::declared_options(),
        eval::declared_options(),
        scorers::declared_options(),
        unet::declared_options(),
        text::declared_options(),
        vae::declared_options(),
        shapes::declared_options(),
        shapes_pipe::declared_options(),
    ]
    .concat()
}

pub fn register_all(engine: &mut Engine) {
    register_types(engine);
    engine.register_global_module(exported_module!(tensor::tensor_api).into());
    engine.register_global_module(exported_module!(rng::rng_api).into());
    engine.register_global_module(exported_module!(io::io_api).into());
    engine.register_global_module(exported_module!(prompts::prompts_api).into());
    engine.register_global_module(exported_module!(params::params_api).into());
    engine.register_global_module(exported_module!(system::system_api).into());
    engine.register_global_module(exported_module!(unet::unet_api).into());
    engine.register_global_module(exported_module!(text::text_api).into());
    engine.register_global_module(exported_module!(vae::vae_api).into());
    engine.register_global_module(exported_module!(diffusion::diffusion_api).into());
    engine.register_global_module(exported_module!(loss::loss_api).into());
    engine.register_global_module(exported_module!(optim::optim_api).into());
    engine.register_global_module(exported_module!(run::run_api).into());
    engine.register_global_module(exported_module!(shapes::shapes_api).into());
    engine.register_global_module(exported_module!(eval::eval_api).into());
    engine.register_global_module(exported_module!(scorers::scorers_api).into());
    engine.register_global_module(exported_module!(lrm::lrm_api).into());
    engine.register_global_module(exported_module!(policy::policy_api).into());
    engine.register_global_module(exported_module!(sampling::sampling_api).into());
    engine.register_global_module(exported_module!(records::records_api).into());
    engine.register_global_module(exported_module!(training::training_api).into());
    engine.register_global_module(exported_module!(lrm_data::lrm_data_api).into());
    engine.register_global_module(exported_module!(shapes_pipe::shapes_pipe_api).into());
}

#[cfg(test)]
mod tests {
    /// Bindings reach files only through the host's gate (`Host::readable`, `Host::writable`,
    /// `Host::read_text`), which returns the paths they may open: none builds a path from a
    /// script string or opens a file itself.
    #[test]
    fn bindings_open_paths_only_through_the_gate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/script/bindings");
        let forbidden = [
            "Path::new(",
            "PathBuf::from(",
            "std::fs",
            "fs::",
            "File::",
            "OpenOptions",
        ];
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().is_some_and(|n| n == "mod.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, line) in text.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for f in forbidden {
                    if line.contains(f) {
                        found.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
                    }
                }
            }
        }
        assert!(
            found.is_empty(),
            "raw file access in bindings:\n{}",
            found.join("\n")
        );
    }
}
