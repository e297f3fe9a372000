use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use lpo::control::{install_signal_handlers, RunControl};
use lpo::run::{check_script, parse_set, run_script, RunOptions};
use lpo::script::{build_engine, EngineOptions, Host, Limits};

#[derive(Parser)]
#[command(
    name = "lpo",
    version,
    about = "Step-level preference optimization of diffusion models, scripted in Rhai"
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
    /// Maximum nesting of script function calls.
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
}

impl SessionArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_operations: self.max_operations,
            max_call_levels: self.max_call_levels,
            max_string_size: self.max_string_size,
            max_array_size: self.max_array_size,
            max_map_size: self.max_map_size,
            ..Limits::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a script headless.
    Run {
        script: PathBuf,
        /// Script parameter, typed (int, float, bool, string); repeatable. Reaches the script as `params`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Stop with exit code 124 after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Compile a script and report every parse error.
    Check { script: PathBuf },
    /// List every registered function with its signature and doc comment.
    Fns {
        /// Rhai's metadata as JSON.
        #[arg(long)]
        json: bool,
        /// Only functions whose name contains this text.
        filter: Option<String>,
    },
    /// Interactive session.
    Repl {
        #[command(flatten)]
        session: SessionArgs,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LPO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let code = match cli.command {
        Command::Run {
            script,
            set,
            timeout,
            session,
        } => {
            let mut params = rhai::Map::new();
            for s in &set {
                match parse_set(s) {
                    Ok((k, v)) => {
                        params.insert(k.into(), v);
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            let device = match lpo::tensor::parse_device(&session.device) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            if !script.is_file() {
                eprintln!("error: script not found: {}", script.display());
                return ExitCode::from(66);
            }
            let control = RunControl::new();
            if let Err(e) = install_signal_handlers(control.clone()) {
                eprintln!("warning: cannot install signal handlers: {e}");
            }
            run_script(
                RunOptions {
                    script,
                    params,
                    device,
                    seed: session.seed,
                    limits: session.limits(),
                    timeout: timeout.map(std::time::Duration::from_secs_f64),
                },
                control,
            )
        }
        Command::Check { script } => check_script(&script),
        Command::Fns { json, filter } => {
            let se = build_engine(
                Host::new(RunControl::new(), candle_core::Device::Cpu, 0),
                &EngineOptions::default(),
            );
            print_functions(&se.engine, json, filter.as_deref())
        }
        Command::Repl { session } => {
            let device = match lpo::tensor::parse_device(&session.device) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let control = RunControl::new();
            if let Err(e) = install_signal_handlers(control.clone()) {
                eprintln!("warning: cannot install signal handlers: {e}");
            }
            lpo::repl::run_repl(Host::new(control.clone(), device, session.seed), control)
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
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
    let mut out = std::io::stdout().lock();
    for f in lpo::script::docs::functions(&metadata) {
        if filter.is_some_and(|flt| !f.name.contains(flt)) {
            continue;
        }
        let mut text = format!("{}\n", f.signature);
        for line in f.doc.lines() {
            text.push_str(&format!("    {line}\n"));
        }
        // A closed pipe (`lpo fns | head`) is not an error.
        if out.write_all(text.as_bytes()).is_err() {
            break;
        }
    }
    0
}
