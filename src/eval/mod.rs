//! Evaluation: paired bootstrap intervals, PNG line plots, a one-page HTML report, and the
//! built-in image scorers (PickScore, HPSv2, aesthetic, CLIP score).

pub mod bootstrap;
pub mod grid_options;
pub mod group_mean;
pub mod number;
pub mod plots;
pub mod report;
pub mod scorers;

pub use bootstrap::{paired_bootstrap, BootstrapOptions, PairedBootstrap};
pub use group_mean::{group_mean, GroupMean};
pub use plots::line_plot;
pub use report::{write_report, write_summary, Report, Summary};
