"""Make the LoCon-style LoRA fixtures of tests/fixtures/interop/ (read by tests/lora_layers.rs).

A PEFT LoRA (rank 2, lora_alpha 2, so the scale is 1 whatever alpha convention a loader uses)
on the tiny UNet of tests/fixtures/tiny-sd with targets of every kind users train: the resnets'
conv1 / conv2 / conv_shortcut / time_emb_proj, the transformers' proj_in / proj_out (1x1 convs
here), ff.net.0.proj / ff.net.2 and attention projections, the time embedding linear_1 /
linear_2, conv_in / conv_out and the down/upsampler convs. lora_B is set to seeded random values
(PEFT starts it at zero, which would test nothing). Written as diffusers' `save_lora_weights`
writes a PEFT state dict: `unet.<module>.lora_A.weight` / `.lora_B.weight`.

Outputs:
  tests/fixtures/interop/locon_peft.safetensors      the LoRA
  tests/fixtures/interop/locon_expected.safetensors  sample, timesteps, encoder_hidden_states,
                                                     out (UNet output with the LoRA),
                                                     base (UNet output without it)

Run from the repository root:
  pip install torch==2.15.0 diffusers==0.42.1 peft==0.21.2 safetensors
  python tests/interop/make_locon_fixtures.py
"""

import os

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "interop")

TARGETS = [
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "linear_1",
    "linear_2",
    "conv_in",
    "conv_out",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "tiny-sd", "unet"))
    unet.eval()
    g = torch.Generator().manual_seed(18)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 700], dtype=torch.int64)
    ehs = torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        base = unet(sample, timesteps, ehs).sample

    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights="gaussian"))
    kinds = {}
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if "lora_A" in name:
                kinds[p.dim()] = kinds.get(p.dim(), 0) + 1
        out = unet(sample, timesteps, ehs).sample
    state = get_peft_model_state_dict(unet)
    adapted = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    for t in TARGETS:
        assert any(m == t or m.endswith("." + t) for m in adapted), f"no module matched {t}"

    os.makedirs(OUT, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(OUT, unet_lora_layers=state, weight_name="locon_peft.safetensors")
    save_file(
        {
            "sample": sample.contiguous(),
            "timesteps": timesteps,
            "encoder_hidden_states": ehs.contiguous(),
            "out": out.contiguous(),
            "base": base.contiguous(),
        },
        os.path.join(OUT, "locon_expected.safetensors"),
    )
    effect = (out - base).abs().max().item()
    print(f"{len(adapted)} adapted modules ({kinds.get(4, 0)} conv, {kinds.get(2, 0)} linear); "
          f"max |LoRA effect| = {effect:.4f}, max |out| = {out.abs().max().item():.4f}")


if __name__ == "__main__":
    main()
