#!/usr/bin/env python3
"""LPO's training step in diffusers + peft, to set against `lpo bench --phase train`.

Same step and shapes as src/bench/mod.rs: for B records, the policy's classifier-free-guided
noise prediction (2B rows: cond then uncond) with LoRA on and the gradient kept, the reference
prediction with the adapters off, the DDIM log-probs of a winner and a loser x_{t-1} under both,
the LPO loss (src/lpo/loss.rs), backward and an AdamW step on the LoRA parameters. Random
weights, f32, CPU. Prints one JSON line whose field names match the Rust report's.

Memory: RSS once the weights, LoRA, optimizer and inputs are in; then the RSS high-water mark
is reset (/proc/self/clear_refs) and read back (VmHWM) after the warm-up and timed steps, as
src/bench/rss.rs does. Linux only for the memory numbers (None elsewhere).

A benchmark, not a test: needs `pip install torch diffusers peft psutil` (see benches/README.md).
"""

import argparse
import json
import math
import os
import sys
import time

# DDIM as `lpo bench` runs it: SD1.5's scheduler, 20 steps ("leading" spacing, offset 1), the
# record's timestep 501 and its predecessor 451, eta 1.
TIMESTEP, PREV_TIMESTEP, ETA, GUIDANCE = 501, 451, 1.0, 5.0
BETA, RATIO_EPS = 500.0, 0.1  # LpoLossConfig::default()
LORA_RANK = 4


def status_mb(key):
    """A /proc/self/status field (kB) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def reset_peak_rss():
    """Set VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="diffusers UNet config JSON (benches/configs/*.json)")
    p.add_argument("--latent-size", type=int, required=True, help="latent H = W")
    p.add_argument("--train-batch", type=int, required=True, help="records B (2B UNet rows)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    import torch
    import torch.nn.functional as F
    import diffusers
    import peft
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        with open(args.config) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: --config {args.config}: {e}")

    t_load = time.perf_counter()
    unet = UNet2DConditionModel.from_config(config)  # f32, random init from the seed
    unet.requires_grad_(False)
    unet_params = sum(p.numel() for p in unet.parameters())
    unet.add_adapter(
        LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_RANK,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    # AdamWConfig::default() with the bench's learning rate.
    opt = torch.optim.AdamW(lora_params, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    load_seconds = time.perf_counter() - t_load

    # The scheduler's alphas (SD1.5: scaled-linear betas 0.00085..0.012, 1000 steps).
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ac = sched.alphas_cumprod.double()
    a_t, a_prev = ac[TIMESTEP].item(), ac[PREV_TIMESTEP].item()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = ETA * math.sqrt(variance)
    direction = math.sqrt(max(1 - a_prev - std * std, 0.0))

    b, n = args.train_batch, args.latent_size
    c = config.get("in_channels", 4)
    text_dim = config["cross_attention_dim"]
    x_t = torch.randn(b, c, n, n)
    x_w = torch.randn(b, c, n, n)
    x_l = torch.randn(b, c, n, n)
    ehs = torch.randn(2 * b, 77, text_dim)  # cond rows, then uncond rows
    x2 = torch.cat([x_t, x_t])
    t2 = torch.full((2 * b,), TIMESTEP, dtype=torch.long)

    def guided(pred):
        cond, uncond = pred.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def log_probs(eps):
        """DDIM step Gaussian log-density of the winner and the loser, mean over dims: [B] each."""
        x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        mean = math.sqrt(a_prev) * x0 + direction * eps
        out = []
        for prev in (x_w, x_l):
            sq = (prev - mean).pow(2).reshape(b, -1).mean(1)
            out.append(-sq / (2 * std * std) - math.log(std) - 0.5 * math.log(2 * math.pi))
        return out

    def lpo_loss(lp_w, lp_w_ref, lp_l, lp_l_ref):
        """src/lpo/loss.rs: clamp(exp(lp - lp_ref), 1 -+ eps) in log space, softplus(-x)."""
        lo, hi = math.log(1 - RATIO_EPS), math.log(1 + RATIO_EPS)
        d_w, d_l = lp_w - lp_w_ref, lp_l - lp_l_ref
        logits = BETA * (d_w.clamp(lo, hi) - d_l.clamp(lo, hi))
        loss = F.softplus(-logits).mean()
        # The detached statistics the Rust loss also reports.
        with torch.no_grad():
            diff = d_w.exp().clamp(1 - RATIO_EPS, 1 + RATIO_EPS) - d_l.exp().clamp(1 - RATIO_EPS, 1 + RATIO_EPS)
            _stats = ((diff > 0).float().mean(), diff.mean())
        return loss

    def step():
        pred = guided(unet(x2, t2, encoder_hidden_states=ehs).sample)
        lp_w, lp_l = log_probs(pred)
        with torch.no_grad():
            unet.disable_adapters()
            ref = guided(unet(x2, t2, encoder_hidden_states=ehs).sample)
            unet.enable_adapters()
            lp_w_ref, lp_l_ref = log_probs(ref)
        loss = lpo_loss(lp_w, lp_w_ref, lp_l, lp_l_ref)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    rss_after_load = status_mb("VmRSS")
    peak_reset = reset_peak_rss()
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    ms = (time.perf_counter() - start) * 1000.0 / args.repeats
    peak = status_mb("VmHWM")
    activation = peak - rss_after_load if peak_reset and peak is not None and rss_after_load is not None else None

    print(
        json.dumps(
            {
                "impl": "torch",
                "device": "cpu",
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "peft": peft.__version__,
                "threads": torch.get_num_threads(),
                "unet_params": unet_params,
                "lora_params": sum(p.numel() for p in lora_params),
                "latent": [c, n, n],
                "train_batch": b,
                "lora_rank": LORA_RANK,
                "repeats": args.repeats,
                "gradient_checkpointing": args.gradient_checkpointing,
                "ms_per_training_step": ms,
                "load_seconds": load_seconds,
                "rss_after_load_mb": rss_after_load,
                "peak_rss_mb": peak,
                "activation_mb": activation,
            }
        )
    )


if __name__ == "__main__":
    main()
