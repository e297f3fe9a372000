//! How tensors print in scripts and the REPL: `Tensor[f32; 2x3] mean=.. std=..` and a preview.

use candle_core::Tensor;

use super::ops::{is_float, to_f64_vec};

const PREVIEW: usize = 6;

pub fn shape_string(t: &Tensor) -> String {
    if t.rank() == 0 {
        return "scalar".into();
    }
    t.dims()
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

pub fn summary(t: &Tensor) -> String {
    let head = format!("Tensor[{}; {}", t.dtype().as_str(), shape_string(t));
    let device = super::device::device_name(t.device());
    let head = if device == "cpu" {
        head
    } else {
        format!("{head}; {device}")
    };
    let values = match to_f64_vec(t) {
        Ok(v) => v,
        Err(e) => return format!("{head}] <unreadable: {e}>"),
    };
    if values.is_empty() {
        return format!("{head}] (empty)");
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    let fmt = |v: f64| {
        if is_float(t.dtype()) {
            format!("{v:.4}")
        } else {
            format!("{}", v as i64)
        }
    };
    let mut preview: Vec<String> = values.iter().take(PREVIEW).map(|&v| fmt(v)).collect();
    if values.len() > PREVIEW {
        preview.push("...".into());
    }
    format!(
        "{head}] mean={} std={} [{}]",
        fmt_stat(mean),
        fmt_stat(std),
        preview.join(", ")
    )
}

fn fmt_stat(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn prints_header_stats_and_preview() {
        let t = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu).unwrap();
        let s = summary(&t);
        assert!(
            s.starts_with("Tensor[f32; 2x3] mean=3.5000 std=1.7078"),
            "{s}"
        );
        assert!(
            s.contains("[1.0000, 2.0000, 3.0000, 4.0000, 5.0000, 6.0000]"),
            "{s}"
        );
    }
}
