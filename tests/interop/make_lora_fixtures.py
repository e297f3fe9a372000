"""Build the LoRA interop fixtures in tests/fixtures/interop/lora/ with diffusers' own savers.

    pip install torch diffusers==0.42.1 peft==0.21.2 transformers safetensors
    python tests/interop/make_lora_fixtures.py        # from the repository root

One rank-4 / alpha-8 adapter on the attention projections (to_q, to_k, to_v, to_out.0) of the
tiny UNet in tests/fixtures/tiny-sd (plus one on the CLIP text encoder's q/k/v/out_proj), written
in every key convention diffusers' `load_lora_weights` reads for the UNet:

  peft_meta.safetensors        save_lora_weights(get_peft_model_state_dict(unet),
                               unet_lora_adapter_metadata=peft_config) -> unet.<m>.lora_A.weight,
                               alpha 8 in the `lora_adapter_metadata` header
  diffusers_meta.safetensors   the training scripts' form: convert_state_dict_to_diffusers(...)
                               -> unet.<m>.lora.down.weight / .lora.up.weight, with metadata
  diffusers_nometa.safetensors the same keys without metadata (diffusers then uses alpha = rank)
  unet_te.safetensors          UNet + text_encoder LoRA in one file (save_lora_weights with
                               text_encoder_lora_layers), both with metadata
  peft_plain.safetensors       raw get_peft_model_state_dict keys (<m>.lora_A.weight), no header
  peft_base_model.safetensors  the same keys under `base_model.model.` (PeftModel's naming)
  kohya.safetensors            convert_state_dict_to_kohya(...) (lora_unet_* / lora_te1_*), with
                               the UNet's `.alpha` tensors set to 8.0 as kohya's trainer writes
                               network_alpha
  peft_model/                  PeftModel.save_pretrained: adapter_model.safetensors
                               (base_model.model.<m>.lora_A.weight) + adapter_config.json (alpha 8)
  attn_processor.safetensors   the old attention-processor form
                               unet.<block>.attnN.processor.to_q_lora.down.weight (renamed by
                               hand: diffusers still reads it, but no longer writes it)

expected.safetensors holds the fixed input (`x`, `t`, `ehs`), the base UNet output `base` and, per
file, `out.<name>`: the UNet output after diffusers loaded that file (`pipe.load_lora_weights`, or
`unet.load_lora_adapter(prefix=None)` for the unprefixed PEFT forms, which the pipeline skips;
`PeftModel.from_pretrained` for peft_model/).
"""

import os
import shutil
import sys
import tempfile

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SD = os.path.join(ROOT, "tests/fixtures/tiny-sd")
OUT = os.path.join(ROOT, "tests/fixtures/interop/lora")
RANK, ALPHA = 4, 8


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


def randomize_lora(model, gen):
    # B starts at zero: make both factors random so the adapter changes the output
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def adapter_metadata(config):
    meta = config.to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    return meta


def save_pipeline_lora(name, unet_layers, unet_meta=None, te_layers=None, te_meta=None):
    with tempfile.TemporaryDirectory() as d:
        StableDiffusionPipeline.save_lora_weights(
            d,
            unet_lora_layers=unet_layers,
            text_encoder_lora_layers=te_layers,
            unet_lora_adapter_metadata=unet_meta,
            text_encoder_lora_adapter_metadata=te_meta,
            weight_name="w.safetensors",
        )
        shutil.copyfile(f"{d}/w.safetensors", f"{OUT}/{name}")


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=gen)
    t = torch.tensor([10, 700], dtype=torch.int64)
    ehs = torch.randn((2, 8, 32), generator=gen)

    src = pipeline()
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    src.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    # transformers' own add_adapter wants a newer peft; inject the adapter with peft itself
    te_config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    inject_adapter_in_model(te_config, src.text_encoder)
    randomize_lora(src.unet, gen)
    randomize_lora(src.text_encoder, gen)
    peft_sd = {k: v.contiguous() for k, v in get_peft_model_state_dict(src.unet).items()}
    te_sd = {k: v.contiguous() for k, v in get_peft_model_state_dict(src.text_encoder).items()}
    unet_meta = adapter_metadata(src.unet.peft_config["default"])
    te_meta = adapter_metadata(te_config)
    diffusers_sd = convert_state_dict_to_diffusers(peft_sd)
    assert all(".lora.down." in k or ".lora.up." in k for k in diffusers_sd), list(diffusers_sd)[:4]

    save_pipeline_lora("peft_meta.safetensors", peft_sd, unet_meta)
    save_pipeline_lora("diffusers_meta.safetensors", diffusers_sd, unet_meta)
    save_pipeline_lora("diffusers_nometa.safetensors", diffusers_sd)
    save_pipeline_lora(
        "unet_te.safetensors", diffusers_sd, unet_meta, convert_state_dict_to_diffusers(te_sd), te_meta
    )
    save_file(peft_sd, f"{OUT}/peft_plain.safetensors")
    save_file({f"base_model.model.{k}": v for k, v in peft_sd.items()}, f"{OUT}/peft_base_model.safetensors")

    kohya = convert_state_dict_to_kohya(
        {**{f"unet.{k}": v for k, v in peft_sd.items()}, **{f"text_encoder.{k}": v for k, v in te_sd.items()}}
    )
    for k in list(kohya):
        if k.startswith("lora_unet_") and k.endswith(".alpha"):
            kohya[k] = torch.tensor(float(ALPHA))
    save_file({k: v.contiguous() for k, v in kohya.items()}, f"{OUT}/kohya.safetensors")

    peft_model = get_peft_model(
        UNet2DConditionModel.from_pretrained(f"{SD}/unet"),
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets),
    )
    set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": v for k, v in peft_sd.items()})
    peft_model.save_pretrained(f"{OUT}/peft_model")
    os.remove(f"{OUT}/peft_model/README.md")  # a generated model card

    old = {}
    for k, v in diffusers_sd.items():
        for proj in ["to_q", "to_k", "to_v"]:
            k = k.replace(f".{proj}.lora.", f".processor.{proj}_lora.")
        k = k.replace(".to_out.0.lora.", ".processor.to_out_lora.")
        old[f"unet.{k}"] = v
    assert all(".processor." in k for k in old), list(old)[:4]
    save_file(old, f"{OUT}/attn_processor.safetensors")

    expected = {"x": x, "t": t, "ehs": ehs}
    with torch.no_grad():
        expected["base"] = pipeline().unet(x, t, ehs).sample
        for name in [
            "peft_meta",
            "diffusers_meta",
            "diffusers_nometa",
            "unet_te",
            "kohya",
            "attn_processor",
            "peft_plain",
            "peft_base_model",
            "peft_model",
        ]:
            pipe = pipeline()
            path = f"{OUT}/{name}.safetensors"
            if name == "peft_plain":
                pipe.unet.load_lora_adapter(path, prefix=None)
            elif name == "peft_model":
                pipe.unet = PeftModel.from_pretrained(pipe.unet, f"{OUT}/peft_model").base_model.model
            elif name == "peft_base_model":
                sd = {k.removeprefix("base_model.model."): v for k, v in load_file(path).items()}
                pipe.unet.load_lora_adapter(sd, prefix=None)
            else:
                pipe.load_lora_weights(path)
            out = pipe.unet(x, t, ehs).sample
            effect = (out - expected["base"]).abs().max().item()
            assert effect > 1e-2, f"{name}: the LoRA did not change the output ({effect})"
            expected[f"out.{name}"] = out.contiguous()
            print(f"{name}: max |lora - base| = {effect:.4f}")
    # the header alpha matters: with metadata (alpha 8, scale 2) vs without (scale 1)
    gap = (expected["out.diffusers_meta"] - expected["out.diffusers_nometa"]).abs().max().item()
    assert gap > 1e-2, gap
    save_file(expected, f"{OUT}/expected.safetensors")
    for folder, _, files in os.walk(OUT):
        for f in files:
            os.chmod(os.path.join(folder, f), 0o644)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
