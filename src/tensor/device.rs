//! Device and dtype names as scripts and the command line spell them.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// `cpu`, `cuda`, `cuda:N` (and `metal:N` where candle was built with it).
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let (kind, ordinal) = match name.split_once(':') {
        Some((kind, n)) => (
            kind.to_string(),
            n.parse::<usize>()
                .with_context(|| format!("device `{name}`: `{n}` is not a device number"))?,
        ),
        None => (name.clone(), 0),
    };
    match kind.as_str() {
        "cuda" | "gpu" => Device::new_cuda(ordinal).with_context(|| {
            format!("device `{name}`: CUDA is unavailable (build with `--features cuda` and run on a machine with an NVIDIA driver)")
        }),
        "metal" => Device::new_metal(ordinal)
            .with_context(|| format!("device `{name}`: Metal is unavailable in this build")),
        _ => bail!("unknown device `{name}`: expected cpu, cuda or cuda:N"),
    }
}

pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" => DType::F32,
        "f16" | "float16" | "half" | "fp16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        "f64" | "float64" | "double" => DType::F64,
        "i64" | "int64" | "long" => DType::I64,
        "u32" | "uint32" => DType::U32,
        "u8" | "uint8" | "bool" => DType::U8,
        other => {
            bail!("unknown dtype `{other}`: expected one of f32, f16, bf16, f64, i64, u32, u8")
        }
    })
}

pub fn dtype_name(dtype: DType) -> &'static str {
    dtype.as_str()
}

/// A dtype in a config, written by name (`"f32"`, `"bf16"`, ... as [`parse_dtype`] reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NamedDType(pub DType);

impl TryFrom<String> for NamedDType {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        parse_dtype(&name).map(Self).map_err(|e| format!("{e:#}"))
    }
}

impl From<NamedDType> for String {
    fn from(d: NamedDType) -> String {
        d.0.as_str().to_string()
    }
}

/// A device in a config, written by name (`"cpu"`, `"cuda:N"`; see [`parse_device`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NamedDevice(pub Device);

impl TryFrom<String> for NamedDevice {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        parse_device(&name).map(Self).map_err(|e| format!("{e:#}"))
    }
}

impl From<NamedDevice> for String {
    fn from(d: NamedDevice) -> String {
        device_name(&d.0)
    }
}

/// The compute dtype a device uses when a script does not name one (f32 on CPU: bf16 conv2d
/// does not run there).
pub fn default_float_dtype(_device: &Device) -> DType {
    DType::F32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_unknown() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("tpu:0")
            .unwrap_err()
            .to_string()
            .contains("unknown device"));
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f8").is_err());
        assert_eq!(dtype_name(DType::F32), "f32");
    }

    #[test]
    fn named_dtypes_and_devices_read_and_write_their_names() {
        let d: NamedDType = serde_json::from_str("\"half\"").unwrap();
        assert_eq!(d.0, DType::F16);
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"f16\"");
        let err = serde_json::from_str::<NamedDType>("\"f8\"").unwrap_err();
        assert!(err.to_string().contains("unknown dtype `f8`"), "{err}");
        let cpu: NamedDevice = serde_json::from_str("\"cpu\"").unwrap();
        assert!(cpu.0.is_cpu());
        assert_eq!(String::from(cpu), "cpu");
    }
}
