//! The process's resident memory (RSS) from `/proc/self/status`, and a resettable peak.
//!
//! A CPU benchmark's activation memory is the RSS high-water mark during the steps minus the
//! RSS once the weights are in: `VmRSS` gives the latter, `VmHWM` the former after writing "5"
//! to `/proc/self/clear_refs` resets the mark to the current RSS (Linux >= 4.0). The Python
//! side of `benches/side_by_side.sh` measures the same way, so the two numbers compare.
//! Off Linux every reading is `None`.

/// Mebibytes from a `/proc/self/status` line's value in kB (e.g. `VmHWM:  123456 kB`).
fn status_field_mb(status: &str, key: &str) -> Option<f64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let kb: f64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb / 1024.0)
    })
}

#[cfg(target_os = "linux")]
fn read_status_field_mb(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status_field_mb(&status, key)
}

#[cfg(not(target_os = "linux"))]
fn read_status_field_mb(_key: &str) -> Option<f64> {
    None
}

/// Current resident set size in MiB (`VmRSS`).
pub fn current_rss_mb() -> Option<f64> {
    read_status_field_mb("VmRSS")
}

/// Highest resident set size in MiB since the start or the last [`reset_peak_rss`] (`VmHWM`).
pub fn peak_rss_mb() -> Option<f64> {
    read_status_field_mb("VmHWM")
}

/// Set the high-water mark to the current RSS. Returns false where that is not possible (off
/// Linux, or a kernel without the reset), in which case the peak covers the whole process.
pub fn reset_peak_rss() -> bool {
    #[cfg(target_os = "linux")]
    {
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// RSS around a piece of work: [`RssWindow::open`] records the RSS and resets the peak,
/// [`RssWindow::close`] reads the peak.
#[derive(Debug, Clone, Copy)]
pub struct RssWindow {
    pub after_load_mb: Option<f64>,
    /// Whether the peak was reset; if not, the peak is the process's since its start.
    pub peak_reset: bool,
}

/// What an [`RssWindow`] saw: the RSS at its start, the peak during it, and their difference.
#[derive(Debug, Clone, Copy, Default)]
pub struct RssUsage {
    pub rss_after_load_mb: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub activation_mb: Option<f64>,
}

impl RssWindow {
    pub fn open() -> Self {
        let after_load_mb = current_rss_mb();
        let peak_reset = reset_peak_rss();
        Self {
            after_load_mb,
            peak_reset,
        }
    }

    pub fn close(self) -> RssUsage {
        let peak = peak_rss_mb();
        RssUsage {
            rss_after_load_mb: self.after_load_mb,
            peak_rss_mb: peak,
            // Without a reset the peak may predate the window (e.g. loading), so no difference.
            activation_mb: match (self.peak_reset, self.after_load_mb, peak) {
                (true, Some(before), Some(peak)) => Some(peak - before),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_fields_in_mib() {
        let status = "Name:\tlpo\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        assert_eq!(status_field_mb(status, "VmHWM"), Some(200.0));
        assert_eq!(status_field_mb(status, "VmRSS"), Some(100.0));
        assert_eq!(status_field_mb(status, "VmSwap"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn touching_200_mb_raises_the_peak_after_a_reset() {
        let window = RssWindow::open();
        assert!(window.peak_reset, "writing /proc/self/clear_refs failed");
        let before = window.after_load_mb.expect("VmRSS");
        // Touch every page: an untouched (zeroed) allocation is not resident.
        let mut buffer = vec![0u8; 200 << 20];
        for (i, page) in buffer.chunks_mut(4096).enumerate() {
            page[0] = i as u8 | 1;
        }
        std::hint::black_box(&buffer);
        drop(buffer);
        let usage = window.close();
        let peak = usage.peak_rss_mb.expect("VmHWM");
        assert!(
            peak - before >= 150.0,
            "peak {peak:.0} MiB should be >= 150 MiB above {before:.0} MiB"
        );
        assert!(usage.activation_mb.unwrap() >= 150.0);
    }
}
