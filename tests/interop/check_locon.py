"""Round trip of LoCon-style LoRAs from lpo to diffusers.

lpo trains a LoRA on every linear and conv layer of the tiny UNet (tests/fixtures/tiny-sd,
targets "all-conv" + "all-linear", rank 4, alpha 8, so alpha != rank), takes a few AdamW steps so
every B is nonzero, and exports it in PEFT and kohya form. Each export is loaded into a diffusers
StableDiffusionPipeline with `load_lora_weights`; its UNet output must match lpo's within 1e-4.

Usage (from the repository root, after `cargo build --release`):
  pip install torch diffusers==0.42.1 peft==0.21.2 transformers safetensors
  LPO_BIN=target/release/lpo python tests/interop/check_locon.py
Exits non-zero on failure.
"""

import os
import subprocess
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny-sd")
TOL = 1e-4

SCRIPT = r"""
let u = load_unet(params.model + "/unet");
let policy = lpo_policy(u, #{lora: #{rank: 4, alpha: 8.0, seed: 1, targets: ["all-conv", "all-linear"]}});
let r = rng(3);
let x = r.randn([2, 4, 8, 8]);
let t = tensor([10, 700]);
let ehs = r.randn([2, 8, 32]);
let target = r.randn([2, 4, 8, 8]);
let opt = adamw(policy.params, #{lr: 0.01});
for i in 0..3 {
    opt.backward_step((u.forward(x, t, ehs) - target).square().mean());
}
u.export_lora(params.out + "/peft.safetensors", #{format: "peft"});
u.export_lora(params.out + "/kohya.safetensors", #{format: "kohya"});
u.lora_enabled = false;
let base = u.forward(x, t, ehs);
u.lora_enabled = true;
save_safetensors(#{sample: x, timesteps: t, encoder_hidden_states: ehs,
                   out: u.forward(x, t, ehs), base: base}, params.out + "/expected.safetensors");
"""


def pipeline():
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(TINY, "vae")),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(TINY, "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(TINY, "tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(TINY, "unet")),
        scheduler=DDIMScheduler.from_pretrained(os.path.join(TINY, "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def unet_output(pipe, e):
    with torch.no_grad():
        return pipe.unet(e["sample"], e["timesteps"], e["encoder_hidden_states"]).sample


def main():
    lpo = os.environ.get("LPO_BIN", os.path.join(ROOT, "target", "release", "lpo"))
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "locon.rhai")
        with open(script, "w") as f:
            f.write(SCRIPT)
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        cmd = [lpo, "run", script, "--run-dir", os.path.join(tmp, "run"), "--set", f"model={TINY}",
               "--set", f"out={out}", "--allow-write", out]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout, done.stderr, sep="\n")
            sys.exit(f"lpo run failed with exit code {done.returncode}")
        e = load_file(os.path.join(out, "expected.safetensors"))
        effect = (e["out"] - e["base"]).abs().max().item()
        if effect < 1e-3:
            failures.append(f"the trained LoRA has no effect (max {effect:.2e})")
        for form in ["peft", "kohya"]:
            path = os.path.join(out, f"{form}.safetensors")
            tensors = load_file(path)
            keys = tensors.keys()
            conv = [k for k, v in tensors.items() if v.dim() == 4]
            pipe = pipeline()
            pipe.load_lora_weights(path)
            diff = (unet_output(pipe, e) - e["out"]).abs().max().item()
            print(f"{form}: {len(keys)} tensors ({len(conv)} 4-D conv), "
                  f"max |diffusers - lpo| = {diff:.2e} (LoRA effect {effect:.3f})")
            if not conv:
                failures.append(f"{form}: no conv adapters in the export")
            if not diff <= TOL:
                failures.append(f"{form}: diffusers output differs by {diff:.2e} > {TOL}")
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("check_locon: OK")


if __name__ == "__main__":
    main()
