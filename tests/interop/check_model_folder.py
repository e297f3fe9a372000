"""Round trip: model folders written by lpo load in diffusers / transformers.

    pip install diffusers==0.42.1 torch transformers safetensors
    LPO_BIN=target/release/lpo python tests/interop/check_model_folder.py

lpo (run from the repository root) writes, into a temporary folder,
1. `sd/`: tests/fixtures/tiny-sd copied with `copy_model`, its UNet replaced by one with a
   random LoRA merged in, saved with `unet.save` (the way scripts/shapes/lpo.rhai writes a
   run's `model/`), plus the UNet's output on fixed inputs;
2. `bare/`: a UNet from tiny-sd's config without the keys real SD1.5 configs lack
   (`only_cross_attention`, the optional ones), whose null diffusers refused with a TypeError;
3. `shapes/`: a pixel-space shapes model (`new_shapes_model`, no VAE) copied and saved the same
   way, with an evaluation cache and a log beside the source that must not be copied.
Then this script checks that
- `UNet2DConditionModel.from_pretrained` loads the three UNets and matches lpo's output;
- `StableDiffusionPipeline.from_pretrained(sd/)` loads every component with its class and
  samples (2 steps);
- `shapes/` has no model_index.json (no diffusers pipeline has no VAE) and its text encoder,
  tokenizer and scheduler load with `from_pretrained(..., subfolder=...)`.
Exits non-zero on the first failure.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextModel

REPO = pathlib.Path(__file__).resolve().parents[2]
LPO_BIN = os.environ.get("LPO_BIN", str(REPO / "target" / "release" / "lpo"))
TOLERANCE = 1e-4

SCRIPT = r"""
// Save `src`'s UNet, changed by a random merged LoRA, over a copy of `src` in `out`, and the
// UNet's output on fixed inputs in `out/io.safetensors`.
fn save_changed(src, out, channels, size, tokens, dim) {
    save_io(load_unet(src), src, out, channels, size, tokens, dim);
}
fn save_io(u, src, out, channels, size, tokens, dim) {
    let policy = lpo_policy(u, #{lora: #{rank: 2, alpha: 2.0, seed: 1}});
    let m = policy.params.to_map();
    let r = rng(5);
    for k in m.keys() { m[k] = r.randn(m[k].shape) * 0.2; }
    policy.params.load_map(m);
    u.merge_lora();
    if src != () { copy_model(src, out); }
    u.save(out + "/unet");
    let x = r.randn([2, channels, size, size]);
    let t = tensor([10, 700]);
    let ehs = r.randn([2, tokens, dim]);
    save_safetensors(#{x: x, t: t, ehs: ehs, y: u.forward(x, t, ehs)}, out + "/io.safetensors");
}
let dir = run_dir();
save_changed(params.tiny_sd, dir + "/sd", 4, 8, 8, 32);
new_shapes_model(dir + "/shapes-base");
write_json(#{note: "not a model file"}, dir + "/shapes-base/eval_cache/cache.json");
save_changed(dir + "/shapes-base", dir + "/shapes", 3, 16, 8, 64);
save_io(random_unet(params.bare_config, #{seed: 2}), (), dir + "/bare", 4, 8, 8, 32);
"""


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)
    print(f"ok: {message}")


def run_lpo(tmp):
    script = tmp / "save_models.rhai"
    script.write_text(SCRIPT)
    tiny_sd = REPO / "tests" / "fixtures" / "tiny-sd"
    config = json.loads((tiny_sd / "unet" / "config.json").read_text())
    bare = {k: v for k, v in config.items() if v is not None and k != "only_cross_attention"}
    bare_config = tmp / "bare_config.json"
    bare_config.write_text(json.dumps(bare))
    run_dir = tmp / "run"
    cmd = [LPO_BIN, "run", str(script), "--run-dir", str(run_dir),
           "--set", f"tiny_sd={tiny_sd}", "--set", f"bare_config={bare_config}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return run_dir


def compare_unet(model_dir, what):
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
    io = load_file(str(model_dir / "io.safetensors"))
    with torch.no_grad():
        y = unet(io["x"], io["t"], encoder_hidden_states=io["ehs"]).sample
    diff = (y - io["y"]).abs().max().item()
    check(diff < TOLERANCE, f"{what}: diffusers' UNet matches lpo's output (max diff {diff:.2e})")


def check_pipeline(sd):
    index = json.loads((sd / "model_index.json").read_text())
    for name, entry in index.items():
        if isinstance(entry, list) and entry != [None, None]:
            check((sd / name).is_dir(), f"sd: model_index.json lists `{name}`, which is present")
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    check(pipe.vae is not None and pipe.safety_checker is None,
          "sd: StableDiffusionPipeline.from_pretrained loads it (VAE, no safety checker)")
    check(type(pipe.unet).__name__ == index["unet"][1], "sd: the UNet has the listed class")
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with torch.no_grad():
        out = pipe("a red circle", num_inference_steps=2, height=side, width=side,
                   output_type="pt", generator=torch.Generator().manual_seed(0))
    images = out.images
    check(tuple(images.shape) == (1, 3, side, side) and torch.isfinite(images).all().item(),
          f"sd: the pipeline samples {side}x{side} images")


def check_shapes(shapes):
    check(not (shapes / "model_index.json").exists(), "shapes: no model_index.json (no VAE)")
    check(not (shapes / "eval_cache").exists(), "shapes: the base's eval cache is not copied")
    CLIPTextModel.from_pretrained(shapes, subfolder="text_encoder")
    AutoTokenizer.from_pretrained(shapes, subfolder="tokenizer")
    DDIMScheduler.from_pretrained(shapes, subfolder="scheduler")
    print("ok: shapes: text encoder, tokenizer and scheduler load with from_pretrained")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = run_lpo(pathlib.Path(tmp))
        compare_unet(run_dir / "sd", "sd")
        check_pipeline(run_dir / "sd")
        compare_unet(run_dir / "bare", "bare")
        compare_unet(run_dir / "shapes", "shapes")
        check_shapes(run_dir / "shapes")
    print("check_model_folder: all checks passed")


if __name__ == "__main__":
    main()
