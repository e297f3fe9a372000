//! Tensor helpers shared by the core and the script bindings: the seeded generator,
//! device/dtype parsing, PyTorch-compatible ops candle lacks, and printing.

pub mod custom_backward;
pub mod device;
pub mod format;
pub mod im2col;
pub mod io;
pub mod memory;
pub mod ops;
pub mod recompute;
pub mod rng;

pub use device::{dtype_name, parse_device, parse_dtype, NamedDType, NamedDevice};
pub use rng::SeededRng;
pub mod grad;
