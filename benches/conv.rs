//! conv2d timings (not a test): the project's im2col + one-gemm [`Conv2d`] against candle's CPU
//! conv2d, forward and forward+backward, at the shapes UNet's sizes (batch 128). `cargo bench
//! --bench conv`.

use candle_core::{Device, Module, Tensor, Var};
use lpo::bench::timed;
use lpo::models::conv::Conv2d;
use lpo::tensor::SeededRng;

/// Backward of a scalar loss over `y`.
fn backward(y: Tensor) -> anyhow::Result<()> {
    y.sqr()?.sum_all()?.backward()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    lpo::malloc_tuning::tune_malloc();
    lpo::cpu_threads::pin_thread_count();
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(0);
    let b = 128;
    for &(c, hw, k, stride, padding) in &[
        (32, 16, 3, 1, 1),
        (64, 16, 3, 1, 1),
        (64, 16, 3, 2, 1),
        (64, 8, 3, 1, 1),
        (64, 4, 3, 1, 1),
        (64, 16, 1, 1, 0),
    ] {
        let x = Var::from_tensor(&rng.randn((b, c, hw, hw), &dev)?)?;
        let w = Var::from_tensor(&rng.randn((c, c, k, k), &dev)?)?;
        let bias = Var::from_tensor(&rng.randn(c, &dev)?)?;
        let ours = Conv2d::new(
            w.as_tensor().clone(),
            Some(bias.as_tensor().clone()),
            stride,
            padding,
        );
        let candle = |x: &Tensor| -> candle_core::Result<Tensor> {
            x.conv2d(&w, padding, stride, 1, 1)?
                .broadcast_add(&bias.reshape((1, c, 1, 1))?)
        };
        let x_frozen = x.as_tensor().detach();
        let fwd_ours = timed(&dev, 5, || Ok(ours.forward(&x_frozen)?))?;
        let fwd_candle = timed(&dev, 5, || Ok(candle(&x_frozen)?))?;
        let fb_ours = timed(&dev, 3, || backward(ours.forward(&x)?))?;
        let fb_candle = timed(&dev, 3, || backward(candle(&x)?))?;
        println!(
            "batch {b}, {c}->{c} ch, {hw}x{hw}, k{k} s{stride} p{padding}: forward {fwd_ours:.1} ms (candle {fwd_candle:.1}), forward+backward {fb_ours:.1} ms (candle {fb_candle:.1})"
        );
    }
    Ok(())
}
