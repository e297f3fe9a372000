//! The memory cap on one tensor: a shape asked for by a script is checked before anything is
//! allocated, because a failed allocation aborts the process (no error, no run log end line)
//! and one the OS grants beyond RAM invites the OOM killer.

use candle_core::DType;

/// Bytes `dims` of `dtype` need, or None when the count overflows.
pub fn tensor_bytes(dims: &[usize], dtype: DType) -> Option<u64> {
    dims.iter()
        .try_fold(dtype.size_in_bytes() as u64, |acc, &d| {
            acc.checked_mul(d as u64)
        })
}

/// An error when a tensor of `dims` and `dtype` would need more than `cap` bytes; `what` names
/// the operation (e.g. `zeros`).
pub fn check_tensor_size(what: &str, dims: &[usize], dtype: DType, cap: u64) -> Result<(), String> {
    match tensor_bytes(dims, dtype) {
        Some(bytes) if bytes <= cap => Ok(()),
        bytes => {
            Err(format!(
            "{what}: a {} tensor of shape {dims:?} needs {}, more than --max-tensor-memory ({})",
            crate::tensor::dtype_name(dtype),
            bytes.map(format_bytes).unwrap_or_else(|| "more bytes than exist".into()),
            format_bytes(cap)
        ))
        }
    }
}

/// The default cap: half of the machine's RAM (4 GiB where it cannot be read).
pub fn default_cap() -> u64 {
    total_ram().map(|r| r / 2).unwrap_or(4 << 30)
}

fn total_ram() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration values.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && page_size > 0).then(|| pages as u64 * page_size as u64)
}

/// `512M`, `8G`, `1.5GiB`, `100000` (bytes): binary units, case-insensitive.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(digits_end);
    let scale: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("`{t}`: not a size (e.g. 512M, 8G, 100000)")),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("`{t}`: not a size (e.g. 512M, 8G, 100000)"))?;
    Ok((n * scale as f64) as u64)
}

/// `37.3 GiB`, `512 B`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_overflow_and_units() {
        assert_eq!(tensor_bytes(&[2, 3], DType::F32), Some(24));
        assert_eq!(tensor_bytes(&[usize::MAX, 2], DType::F32), None);
        let err = check_tensor_size("zeros", &[100000, 100000], DType::F32, 1 << 30).unwrap_err();
        assert!(
            err.contains("37.3 GiB") && err.contains("--max-tensor-memory (1.0 GiB)"),
            "{err}"
        );
        assert!(check_tensor_size("zeros", &[1024, 256], DType::F32, 1 << 20).is_ok());
        assert_eq!(parse_bytes("8G").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("100000").unwrap(), 100000);
        assert!(parse_bytes("8 apples").is_err());
        assert!(default_cap() > 0);
    }
}
