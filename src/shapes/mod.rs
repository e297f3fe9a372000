//! The shapes world: a tiny text-to-image world (coloured shapes on 16x16 images) in which the
//! whole LPO pipeline runs in minutes on a CPU, with a pixel-reading judge as ground truth.

pub mod dataset;
pub mod judge;
pub mod model_maker;
pub mod world;

pub use dataset::{make_batch, Batch, BatchOptions, Split};
pub use judge::{Judge, Judgement};
pub use world::{Placement, Prompt, RenderOptions, ShapesWorld, COLOURS, IMAGE_SIZE, SHAPES};
