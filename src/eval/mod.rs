//! Evaluation: paired bootstrap intervals, PNG line plots and a one-page HTML report.

pub mod bootstrap;
pub mod number;
pub mod plots;
pub mod report;

pub use bootstrap::{paired_bootstrap, PairedBootstrap};
pub use plots::line_plot;
pub use report::{write_report, write_summary, Report, Summary};
