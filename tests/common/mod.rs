//! Helpers shared by the golden tests: fixture paths, a script engine on the CPU, tolerant
//! tensor comparison.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A script engine as `lpo run` builds it, on the CPU with seed 0.
pub fn engine() -> rhai::Engine {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
    .engine
}

/// |a - b| <= atol + rtol * |b| everywhere, with the worst offender in the message.
pub fn assert_close(a: &Tensor, b: &Tensor, atol: f64, rtol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    let mut worst = (0.0, 0usize);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    assert!(
        worst.0 <= 0.0,
        "{what}: entry {} = {} vs reference {}",
        worst.1,
        a[worst.1],
        b[worst.1]
    );
}

/// The tensor at `key` of a script map.
pub fn get(map: &rhai::Map, key: &str) -> Tensor {
    map.get(key)
        .unwrap_or_else(|| panic!("no `{key}`"))
        .clone()
        .cast::<Tensor>()
}

/// Run the `lpo` binary in `dir` and collect its output; panics if it outlives `timeout`.
pub fn run_lpo(dir: &Path, args: &[&str], timeout: std::time::Duration) -> std::process::Output {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_lpo"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lpo");
    // Drain the pipes while waiting: output over a pipe's buffer (64 KiB) would block the child.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("lpo {args:?} did not finish in {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The largest |element| of `t` (f32).
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a - b| over two tensors of the same shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}
