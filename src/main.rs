use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use lpo::run::headless::Headless;
use lpo::run::{check_script, parse_set};
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host, Limits};

#[derive(Parser)]
#[command(
    name = "lpo",
    version,
    about = "Step-level preference optimization of diffusion models, scripted in Rhai",
    after_help = LOG_HELP
)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Clone)]
struct SessionArgs {
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of `rng()` without an argument (and of recipes that read `default_seed()`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop with exit code 3 after this many script operations (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    max_operations: u64,
    /// Maximum nesting of script function calls (stopped sooner, also with exit code 3, when
    /// the native stack would overflow).
    #[arg(long, default_value_t = 128)]
    max_call_levels: usize,
    /// Maximum length of a script string.
    #[arg(long, default_value_t = 64 << 20)]
    max_string_size: usize,
    /// Maximum length of a script array.
    #[arg(long, default_value_t = 10_000_000)]
    max_array_size: usize,
    /// Maximum entries of a script map.
    #[arg(long, default_value_t = 1_000_000)]
    max_map_size: usize,
    /// Largest tensor a script may build from a shape it gives (zeros, randn, broadcasting,
    /// matmul, ...), e.g. 512M, 8G (default: half of the RAM); larger is a runtime error.
    #[arg(long, value_name = "SIZE", value_parser = lpo::tensor::memory::parse_bytes)]
    max_tensor_memory: Option<u64>,
    /// Let the script read files under DIR (repeatable). `lpo run` scripts read only their own
    /// folder, the project (the working folder when it holds stdlib/), the run folder, paths
    /// given in params, and these; the REPL is unconfined unless an --allow-* flag is given.
    #[arg(long, value_name = "DIR")]
    allow_read: Vec<PathBuf>,
    /// Let the script write (and read) files under DIR (repeatable). `lpo run` scripts write
    /// only under their run folder and these.
    #[arg(long, value_name = "DIR")]
    allow_write: Vec<PathBuf>,
}

impl SessionArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_operations: self.max_operations,
            max_call_levels: self.max_call_levels,
            max_string_size: self.max_string_size,
            max_array_size: self.max_array_size,
            max_map_size: self.max_map_size,
            max_tensor_memory: self
                .max_tensor_memory
                .unwrap_or_else(lpo::tensor::memory::default_cap),
            ..Limits::default()
        }
    }

    /// The `--allow-read` / `--allow-write` folders.
    fn grants(&self) -> lpo::runtime::confinement::Grants {
        lpo::runtime::confinement::Grants {
            read: self.allow_read.clone(),
            write: self.allow_write.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a script headless, in a run folder (exit codes: 0 ok, 1 runtime error, 2 usage,
    /// 3 safety limit, 65 parse error, 66 not found, 75 run folder locked by another process,
    /// 124 deadline, 130 SIGINT, 143 SIGTERM). `lpo run SCRIPT --help` lists the script's
    /// parameters.
    #[command(disable_help_flag = true)]
    Run {
        /// The script (omit with --resume).
        #[arg(required_unless_present_any = ["resume", "help"], conflicts_with = "resume")]
        script: Option<PathBuf>,
        /// Print help; with a SCRIPT, the script's declared parameters (it does not run).
        #[arg(short, long)]
        help: bool,
        /// Script parameter; repeatable. Reaches the script as `params`. A script that declares
        /// its parameters (`const PARAMS`) gets the value as the declared type, and an unknown
        /// key, wrong type or out-of-range value stops with exit 2; otherwise the value is typed
        /// as it reads (int, float, bool, string).
        #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "resume")]
        set: Vec<String>,
        /// Params as a JSON object (`--set` values override its keys).
        #[arg(long, value_name = "JSON", hide = true, conflicts_with = "resume")]
        params_json: Option<String>,
        /// Stop with exit code 124 after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// The run folder (default: runs/<script stem>-<YYYYmmdd-HHMMSS>).
        #[arg(long, value_name = "DIR", conflicts_with = "resume")]
        run_dir: Option<PathBuf>,
        /// Continue RUN_DIR with its stored script and params (`params.resume` is true and
        /// `checkpoint_latest()` gives the last checkpoint).
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// How many checkpoints `checkpoint_save` keeps (0 = all).
        #[arg(long, default_value_t = 3)]
        keep_checkpoints: usize,
        /// Metric keys whose non-finite value halts the run (repeatable; default `loss`).
        #[arg(long, value_name = "KEY", default_values_t = vec!["loss".to_string()])]
        halt_on_nonfinite: Vec<String>,
        /// Seconds a script that polls `should_stop()` gets after a signal before it is stopped by force.
        #[arg(long, default_value_t = 60.0)]
        stop_grace: f64,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Run the jobs of a schedule file (TOML) when they are due.
    Schedule {
        file: PathBuf,
        /// Run what is due now, wait for it, and exit (for crontab or a systemd timer).
        #[arg(long)]
        once: bool,
        /// Pretend the clock started at this time (RFC 3339), for tests.
        #[arg(long, hide = true)]
        now: Option<String>,
        /// Stop the foreground loop after this many seconds (for tests).
        #[arg(long, hide = true)]
        stop_after: Option<f64>,
    },
    /// Compile a script and report every parse error.
    Check { script: PathBuf },
    /// List every registered function with its signature and doc comment.
    Fns {
        /// Rhai's metadata as JSON.
        #[arg(long, conflicts_with = "markdown")]
        json: bool,
        /// The API reference as Markdown (docs/API.md is made with this).
        #[arg(long)]
        markdown: bool,
        /// Only functions whose name contains this text (exit 1, naming close ones, when none
        /// does).
        filter: Option<String>,
    },
    /// Time LPO's sampling and training steps on full-size SD1.5 / SDXL shapes with random
    /// weights (see scripts/gpu_check.sh), printing a JSON report.
    Bench {
        #[arg(long, value_enum, default_value_t = lpo::bench::BenchModel::Sd15)]
        model: lpo::bench::BenchModel,
        /// Compute device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Model dtype: f32, bf16 or f16 (LoRA master weights and optimizer state stay f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// How the training step gets its reference prediction.
        #[arg(long, value_enum, default_value_t = lpo::bench::Reference::LoraOff)]
        reference: lpo::bench::Reference,
        #[arg(long, value_enum, default_value_t = lpo::bench::Phase::All)]
        phase: lpo::bench::Phase,
        /// Candidates per prompt.
        #[arg(long, default_value_t = 4)]
        k: usize,
        /// Timed repetitions after one warm-up.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long)]
        sample_batch: Option<usize>,
        #[arg(long)]
        train_batch: Option<usize>,
        /// Accumulate the training batch's gradients over micro-batches of this many rows.
        #[arg(long)]
        micro_batch: Option<usize>,
        /// Latent height = width instead of the model's (e.g. 32 to run SD1.5 on a CPU).
        #[arg(long)]
        latent_size: Option<usize>,
        /// Recompute block activations in backward (diffusers' enable_gradient_checkpointing).
        #[arg(long)]
        gradient_checkpointing: bool,
    },
    /// Write a new random model in the diffusers layout (`shapes`: the tiny pixel-space model of
    /// the shapes world: unet/, text_encoder/, tokenizer/, scheduler/).
    NewModel {
        /// Which model: `shapes`.
        kind: String,
        /// The output folder.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Interactive session.
    Repl {
        #[command(flatten)]
        session: SessionArgs,
    },
}

/// The part of `lpo --help` on the log filter variables.
const LOG_HELP: &str = "Logging:
  LPO_LOG    log filter, e.g. `debug`, `warn`, `warn,script=debug` (wins over RUST_LOG)
  RUST_LOG   used when LPO_LOG is not set (same syntax, tracing's EnvFilter)
  The default is `info`; script print() logs at info and debug() at debug (target `script`).";

/// What is logged: `LPO_LOG` if set, else `RUST_LOG` (tracing's usual variable), else `info`.
/// A value that is not a valid filter is reported and skipped, not silently replaced.
fn log_filter() -> tracing_subscriber::EnvFilter {
    for var in ["LPO_LOG", "RUST_LOG"] {
        let Ok(directives) = std::env::var(var) else {
            continue;
        };
        match tracing_subscriber::EnvFilter::try_new(&directives) {
            Ok(filter) => return filter,
            Err(e) => eprintln!("warning: ignoring {var}={directives:?}: {e}"),
        }
    }
    tracing_subscriber::EnvFilter::new("info")
}

fn init_logging(format: LogFormat) {
    let filter = log_filter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(lpo::runtime::log::TeeWriter::make);
    match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // Scripts run on this thread: a deep stack lets them recurse deeply (and the engine stops
    // them with exit code 3 before it overflows; see lpo::script::stack).
    let main = std::thread::Builder::new()
        .name("lpo-main".into())
        .stack_size(lpo::script::stack::SCRIPT_THREAD_STACK)
        .spawn(lpo_main);
    match main.map(|m| m.join()) {
        Ok(Ok(code)) => code,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        // No thread with that stack (a strict memory limit): run on this one.
        Err(_) => lpo_main(),
    }
}

fn lpo_main() -> ExitCode {
    lpo::malloc_tuning::tune_malloc();
    lpo::cpu_threads::pin_thread_count();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let code = match cli.command {
        Command::Run {
            script,
            help,
            set,
            params_json,
            timeout,
            run_dir,
            resume,
            keep_checkpoints,
            halt_on_nonfinite,
            stop_grace,
            session,
        } => {
            if help {
                return ExitCode::from(match &script {
                    Some(script) => lpo::run::print_params_help(script),
                    None => print_run_help(),
                } as u8);
            }
            let mut params = rhai::Map::new();
            if let Some(json) = params_json {
                let value: Result<serde_json::Value, _> = serde_json::from_str(&json);
                match value
                    .ok()
                    .and_then(|v| lpo::run::params_json::params_from_json(v).ok())
                {
                    Some(m) => params = m,
                    None => {
                        eprintln!("error: --params-json: not a JSON object");
                        return ExitCode::from(2);
                    }
                }
            }
            let set = match set.iter().map(|s| parse_set(s)).collect() {
                Ok(set) => set,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if !(stop_grace.is_finite() && stop_grace >= 0.0)
                || timeout.is_some_and(|t| !(t.is_finite() && t >= 0.0))
            {
                eprintln!("error: --timeout and --stop-grace take a number of seconds >= 0");
                return ExitCode::from(2);
            }
            lpo::run::headless::run(Headless {
                script,
                resume,
                params,
                set,
                device: session.device.clone(),
                seed: session.seed,
                limits: session.limits(),
                grants: session.grants(),
                timeout: timeout.map(std::time::Duration::from_secs_f64),
                run_dir,
                keep_checkpoints,
                halt_on_nonfinite,
                stop_grace: std::time::Duration::from_secs_f64(stop_grace),
            })
        }
        Command::Schedule {
            file,
            once,
            now,
            stop_after,
        } => lpo::jobs::main(&file, once, now.as_deref(), stop_after),
        Command::Check { script } => check_script(&script),
        Command::Fns {
            json,
            markdown,
            filter,
        } => {
            let se = build_engine(
                Host::new(RunControl::new(), candle_core::Device::Cpu, 0),
                &EngineOptions::default(),
            );
            if markdown {
                match lpo::repl::markdown::api_reference(&se) {
                    Ok(text) => {
                        use std::io::Write;
                        let _ = std::io::stdout().write_all(text.as_bytes());
                        0
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        1
                    }
                }
            } else {
                print_functions(&se.engine, json, filter.as_deref())
            }
        }
        Command::Bench {
            model,
            device,
            dtype,
            reference,
            phase,
            k,
            repeats,
            sample_batch,
            train_batch,
            micro_batch,
            latent_size,
            gradient_checkpointing,
        } => {
            let device = match lpo::tensor::parse_device(&device) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let opts = lpo::bench::BenchOptions {
                model,
                dtype,
                reference,
                phase,
                k,
                repeats: repeats.max(1),
                sample_batch,
                train_batch,
                micro_batch,
                latent_size,
                gradient_checkpointing,
            };
            match lpo::bench::run(opts, &device) {
                Ok(report) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report).unwrap_or_default()
                    );
                    0
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
        Command::NewModel { kind, out, seed } => {
            if kind != "shapes" {
                eprintln!("error: new-model: unknown model `{kind}` (known: shapes)");
                return ExitCode::from(2);
            }
            let spec = lpo::shapes::model_maker::ShapesModelSpec {
                seed,
                ..Default::default()
            };
            match lpo::shapes::model_maker::make_shapes_model(&out, &spec) {
                Ok(n) => {
                    println!("wrote {} (UNet: {n} parameters)", out.display());
                    0
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
        Command::Repl { session } => {
            let device = match lpo::tensor::parse_device(&session.device) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            // The REPL installs its signal handler itself, after the line editor's.
            let control = RunControl::new();
            let mut host = Host::new(control.clone(), device, session.seed);
            host.max_tensor_bytes = session.limits().max_tensor_memory;
            if !(session.allow_read.is_empty() && session.allow_write.is_empty()) {
                host = host.with_confinement(session.grants().repl_confinement());
            }
            lpo::repl::run_repl(host, control)
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// `lpo run --help` (clap's help flag is replaced by one that also serves `lpo run SCRIPT --help`).
fn print_run_help() -> i32 {
    use clap::CommandFactory;
    let mut cli = Cli::command();
    cli.build();
    match cli.find_subcommand_mut("run") {
        Some(run) => {
            let _ = run.print_long_help();
            0
        }
        None => 1,
    }
}

fn print_functions(engine: &rhai::Engine, json: bool, filter: Option<&str>) -> i32 {
    let metadata = match engine.gen_fn_metadata_to_json(false) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: cannot read function metadata: {e}");
            return 1;
        }
    };
    if json {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{metadata}");
        return 0;
    }
    use std::io::Write;
    let functions = lpo::script::docs::functions(&metadata);
    let mut out = std::io::stdout().lock();
    let mut shown = 0;
    for f in &functions {
        if filter.is_some_and(|flt| !f.name.contains(flt)) {
            continue;
        }
        shown += 1;
        let text = f.to_text();
        // A closed pipe (`lpo fns | head`) is not an error.
        if out.write_all(text.as_bytes()).is_err() {
            break;
        }
    }
    match filter {
        Some(flt) if shown == 0 => {
            let names: Vec<&str> = functions.iter().map(|f| f.name.as_str()).collect();
            eprintln!(
                "error: no function matches `{flt}`{}",
                lpo::script::suggest::did_you_mean(flt, &names)
            );
            1
        }
        _ => 0,
    }
}
