"""Round trip: a LoRA written by lpo's `save_lora` (alpha != rank) loads in diffusers'
`load_lora_weights` and gives the UNet output lpo computes; `export_lora` (PEFT, alpha folded
into B) does too.

    pip install torch diffusers==0.42.1 peft==0.21.2 transformers safetensors
    LPO_BIN=target/release/lpo python tests/interop/check_lora.py    # from the repository root

Exits non-zero on failure and prints what it checked.
"""

import os
import subprocess
import sys
import tempfile

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SD = os.path.join(ROOT, "tests/fixtures/tiny-sd")
LPO = os.environ.get("LPO_BIN", os.path.join(ROOT, "target/release/lpo"))
RANK, ALPHA = 2, 6.0
TOL = 1e-4

SCRIPT = f"""
let u = load_unet("{SD}");
let policy = lpo_policy(u, #{{lora: #{{rank: {RANK}, alpha: {ALPHA}, seed: 1}}}});
let m = policy.params.to_map();
let r = rng(5);
for k in m.keys() {{ m[k] = r.randn(m[k].shape) * 0.2; }}
policy.params.load_map(m);
let x = r.randn([2, 4, 8, 8]);
let t = tensor([10, 700]);
let ehs = r.randn([2, 8, 32]);
u.save_lora(run_dir() + "/lora.safetensors");
u.export_lora(run_dir() + "/peft.safetensors", #{{format: "peft"}});
let out = u.forward(x, t, ehs);
u.lora_enabled = false;
save_safetensors(#{{x: x, t: t, ehs: ehs, out: out, base: u.forward(x, t, ehs)}}, run_dir() + "/io.safetensors");
"""


def pipeline():
    return StableDiffusionPipeline(
        vae=None,
        text_encoder=CLIPTextModel.from_pretrained(f"{SD}/text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(f"{SD}/tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(f"{SD}/unet"),
        scheduler=DDIMScheduler.from_pretrained(f"{SD}/scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def diffusers_output(lora_file, io):
    pipe = pipeline()
    pipe.load_lora_weights(lora_file)
    with torch.no_grad():
        return pipe.unet(io["x"], io["t"], io["ehs"]).sample


def main():
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "save.rhai")
        with open(script, "w") as f:
            f.write(SCRIPT)
        run = os.path.join(tmp, "run")
        proc = subprocess.run([LPO, "run", script, "--run-dir", run], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n")
            print(f"FAIL lpo run exited {proc.returncode}")
            return 1
        io = load_file(f"{run}/io.safetensors")
        effect = (io["out"] - io["base"]).abs().max().item()
        check(effect > 1e-2, f"the LoRA changes lpo's output (max {effect:.3f})")

        with safe_open(f"{run}/lora.safetensors", "pt") as f:
            header = f.metadata() or {}
        check("lora_adapter_metadata" in header, "save_lora writes diffusers' lora_adapter_metadata header")

        diff = (diffusers_output(f"{run}/lora.safetensors", io) - io["out"]).abs().max().item()
        check(diff < TOL, f"save_lora (rank {RANK}, alpha {ALPHA}) in diffusers vs lpo: max |diff| {diff:.2e}")

        # without the header diffusers would use alpha = rank: the header is what makes it right
        bare = f"{tmp}/bare.safetensors"
        save_file(load_file(f"{run}/lora.safetensors"), bare)
        wrong = (diffusers_output(bare, io) - io["out"]).abs().max().item()
        check(wrong > 1e-2, f"without the header the scale is off (max |diff| {wrong:.3f}): alpha != rank matters")

        diff = (diffusers_output(f"{run}/peft.safetensors", io) - io["out"]).abs().max().item()
        check(diff < TOL, f"export_lora peft in diffusers vs lpo: max |diff| {diff:.2e}")

    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("all LoRA round-trip checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
