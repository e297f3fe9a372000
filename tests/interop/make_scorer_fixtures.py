#!/usr/bin/env python
"""Golden fixtures for the built-in scorers (tests/scorers.rs), written to tests/fixtures/scorers/.

    /work/pyenv/bin/python tests/interop/make_scorer_fixtures.py [--out tests/fixtures/scorers]

Needs torch, transformers (5.x), open_clip_torch, torchvision, Pillow, safetensors.

* A tiny CLIP BPE tokenizer: the 512 byte tokens, the first 120 merges of OpenAI's BPE list (shipped
  with open_clip), bos/eos: vocab.json + merges.txt + tokenizer_config.json.
* Tiny random models of each scorer's architecture, at image size 32 (patch 8), stored as f16
  safetensors (Python computes with the same f16-rounded weights in f32):
  - pickscore/: transformers CLIPModel, gelu (ViT-H/14's activation), HF folder layout;
    score = exp(logit_scale) * cos.
  - clip_score/: transformers CLIPModel, quick_gelu (OpenAI ViT-L/14's); score = 100 * max(cos, 0).
  - aesthetic/: transformers CLIPModel (quick_gelu) + aesthetic_mlp.safetensors (the
    improved-aesthetic-predictor MLP shape, 5 linears without activations, scaled down);
    score = mlp(image_embeds / |image_embeds|).
  - hpsv2/: open_clip.CLIP (GELU), saved as a .pt and converted with
    scripts/convert_scorer_weights.py open_clip; score = cos (HPSv2 uses no logit scale).
* Each reference's own preprocessing, on PIL images:
  - HF CLIPImageProcessorPil (PickScore, CLIP score): shortest side -> S (PIL bicubic), centre crop
    with top = (h - S) // 2.
  - OpenAI clip's transform (aesthetic): torchvision Resize(S, BICUBIC) on PIL + CenterCrop
    (top = round((h - S) / 2)).
  - HPSv2's ResizeMaxSize(S, fill=0): longest side -> S (round), PIL bicubic, zero pad to SxS.
  then /255 and CLIP mean/std.
* expected.safetensors: per kind `<kind>_scores` [3] (f64); `ids` [3, 77] (i64, the prompts
  through HF CLIPTokenizer); `pixels_<mode>` [3, 3, 32, 32] model inputs; preprocessing goldens `pre_<mode>_<case>` as u8 [3, S, S]
  (before normalisation).
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a photo of a cat", "a red car on a street", "A painting of a DOG, 8k!"]
IMAGE_OF_PROMPT = ["a.png", "b.png", "a.png"]
SIZE = 32


def byte_unicode_table():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tokenizer(out, n_merges=120):
    import open_clip

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")[1:1 + n_merges]
    merges = [tuple(m.split()) for m in lines]
    base = byte_unicode_table()
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] \
        + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
    return len(vocab)


def hf_tokenize(tok_dir, prompts):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                        pad_token="<|endoftext|>")
    return tok(prompts, padding="max_length", max_length=77, truncation=True,
               return_tensors="pt").input_ids


def make_images(out):
    """Two small test images and a larger 'photo' (synthetic: gradients, edges, texture, noise)."""
    rng = np.random.default_rng(7)

    def synth(w, h, seed):
        r = np.random.default_rng(seed)
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        img = np.zeros((h, w, 3))
        img[..., 0] = 128 + 100 * np.sin(x / (3 + seed) + y / 7)
        img[..., 1] = 255 * (x / max(w - 1, 1)) * (y / max(h - 1, 1))
        img[..., 2] = np.where((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 3) ** 2, 230, 20)
        img += r.normal(0, 12, img.shape)
        return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")

    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    a = synth(40, 27, 1)
    b = synth(27, 41, 2)
    photo = synth(150, 97, 3)
    tiny = synth(23, 17, 4)
    a.save(os.path.join(out, "images", "a.png"))
    b.save(os.path.join(out, "images", "b.png"))
    photo.save(os.path.join(out, "images", "photo.png"))
    tiny.save(os.path.join(out, "images", "tiny.png"))
    del rng


# ---- the three reference preprocessings (PIL in, u8 [3, S, S] out) ----

def pre_hf_u8(img, s):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    p = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                              do_rescale=False, do_normalize=False)
    x = p(images=img, return_tensors="pt").pixel_values[0]
    return x.round().to(torch.uint8)


def pre_tv_u8(img, s):
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, PILToTensor, Resize

    t = Compose([Resize(s, interpolation=InterpolationMode.BICUBIC), CenterCrop(s), PILToTensor()])
    return t(img.convert("RGB"))


def pre_hps_u8(img, s):
    # HPSv2's ResizeMaxSize(s, fill=0) (hpsv2/src/open_clip/transform.py), then PILToTensor.
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode, PILToTensor

    width, height = img.size
    scale = s / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        img = F.resize(img, new_size, InterpolationMode.BICUBIC)
        pad_h = s - new_size[0]
        pad_w = s - new_size[1]
        img = F.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return PILToTensor()(img.convert("RGB"))


PRE = {"hf": pre_hf_u8, "torchvision": pre_tv_u8, "hpsv2": pre_hps_u8}


def normalize(u8):
    x = u8.float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def reference_pixels_hf(img, s):
    """The HF processor end to end (checks that `normalize(pre_hf_u8)` is what it feeds the model)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    p = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    return p(images=img, return_tensors="pt").pixel_values[0]


def round_f16_(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def perturb_(model, seed):
    """Norm scales 1 + 0.1 randn, biases 0.05 randn, so that affine params and biases matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


def hf_clip(vocab, act, eos_token_id, seed):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
                         eos_token_id=eos_token_id, bos_token_id=vocab - 2, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIZE, patch_size=8, hidden_act=act),
        projection_dim=12, logit_scale_init_value=2.6592)
    m = CLIPModel(cfg).eval()
    perturb_(m, seed + 100)
    round_f16_(m)
    return m


def save_hf(m, out, tok_dir, sizes):
    os.makedirs(out, exist_ok=True)
    m.config.save_pretrained(out)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in m.state_dict().items()}
    save_file(sd, os.path.join(out, "model.safetensors"))
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), out)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": sizes},
                   "crop_size": {"height": sizes, "width": sizes}, "do_center_crop": True,
                   "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3}, f, indent=2)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "scorers"))
    args = ap.parse_args()
    out = args.out
    torch.set_num_threads(2)
    os.makedirs(out, exist_ok=True)
    tok_dir = os.path.join(out, "tokenizer")
    vocab = write_tokenizer(tok_dir)
    make_images(out)
    ids = hf_tokenize(tok_dir, PROMPTS)
    images = {n: Image.open(os.path.join(out, "images", n)).convert("RGB") for n in ("a.png", "b.png")}
    expected = {}
    notes = []

    def pixels(mode):
        return torch.stack([normalize(PRE[mode](images[n], SIZE)) for n in IMAGE_OF_PROMPT])

    # PickScore-shaped HF CLIP (gelu, legacy eos_token_id 2 -> argmax pooling).
    pick = hf_clip(vocab, "gelu", 2, 11)
    save_hf(pick, os.path.join(out, "pickscore"), tok_dir, SIZE)
    px = pixels("hf")
    ref = torch.stack([reference_pixels_hf(images[n], SIZE) for n in IMAGE_OF_PROMPT])
    assert (px - ref).abs().max() < 1e-5, (px - ref).abs().max()
    with torch.no_grad():
        ie = unit(pick.get_image_features(pixel_values=px).pooler_output
                  if hasattr(pick.get_image_features(pixel_values=px), "pooler_output")
                  else pick.get_image_features(pixel_values=px))
        te_out = pick.get_text_features(input_ids=ids)
        te = unit(te_out.pooler_output if hasattr(te_out, "pooler_output") else te_out)
        pick_scores = pick.logit_scale.exp() * (ie * te).sum(-1)
    expected.update(pickscore_scores=pick_scores.double(), ids=ids, pixels_hf=px)

    # CLIP score (quick_gelu, eos_token_id = the real eos id -> first-eos pooling).
    # The first seed from 12 whose cosines have both signs, so the clamp at 0 and the scale show.
    for seed in range(12, 200):
        cs = hf_clip(vocab, "quick_gelu", vocab - 1, seed)
        with torch.no_grad():
            o = cs.get_image_features(pixel_values=px)
            ie = unit(o.pooler_output if hasattr(o, "pooler_output") else o)
            o = cs.get_text_features(input_ids=ids)
            te = unit(o.pooler_output if hasattr(o, "pooler_output") else o)
            cos = (ie * te).sum(-1)
        if (cos > 0.01).sum() >= 2 and (cos < 0).any():
            break
    clip_scores = 100 * torch.clamp(cos, min=0)
    save_hf(cs, os.path.join(out, "clip_score"), tok_dir, SIZE)
    notes.append(f"clip_score raw cos: {cos.tolist()}")
    expected.update(clip_score_scores=clip_scores.double())

    # Aesthetic: CLIP (quick_gelu) vision + the MLP head (no activations), OpenAI clip preprocessing.
    ae = hf_clip(vocab, "quick_gelu", vocab - 1, 213)
    ae_dir = os.path.join(out, "aesthetic")
    save_hf(ae, ae_dir, tok_dir, SIZE)
    torch.manual_seed(14)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(12, 24), torch.nn.Dropout(0.2), torch.nn.Linear(24, 16), torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 4), torch.nn.Linear(4, 1)).eval()
    with torch.no_grad():  # larger weights than the default init, so the scores spread
        for m in mlp:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(4.0)
    round_f16_(mlp)
    save_file({f"layers.{k}": v.contiguous() for k, v in mlp.state_dict().items()},
              os.path.join(ae_dir, "aesthetic_mlp.safetensors"))
    px_tv = pixels("torchvision")
    with torch.no_grad():
        o = ae.get_image_features(pixel_values=px_tv)
        ie = o.pooler_output if hasattr(o, "pooler_output") else o
        ae_scores = mlp(unit(ie)).squeeze(-1)
    expected.update(aesthetic_scores=ae_scores.double(), pixels_torchvision=px_tv)

    # HPSv2-shaped open_clip model (GELU), via the committed converter.
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    oc_cfg = {"embed_dim": 12,
              "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 16, "head_width": 8, "mlp_ratio": 2.0,
                             "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": vocab, "width": 16, "heads": 2, "layers": 2,
                           "mlp_ratio": 2.0}}
    torch.manual_seed(15)
    oc = open_clip.CLIP(oc_cfg["embed_dim"], CLIPVisionCfg(**oc_cfg["vision_cfg"]),
                        CLIPTextCfg(**oc_cfg["text_cfg"]), quick_gelu=False).eval()
    perturb_(oc, 115)
    round_f16_(oc)
    px_hps = pixels("hpsv2")
    with torch.no_grad():
        ie = unit(oc.encode_image(px_hps))
        te = unit(oc.encode_text(ids))
        hps_scores = (ie * te).sum(-1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "hps_tiny.pt")
        cfg_path = os.path.join(tmp, "cfg.json")
        torch.save({"state_dict": {"module." + k: v for k, v in oc.state_dict().items()}}, ckpt)
        with open(cfg_path, "w") as f:
            json.dump(oc_cfg, f)
        subprocess.check_call([sys.executable, os.path.join(ROOT, "scripts", "convert_scorer_weights.py"),
                               "open_clip", "--checkpoint", ckpt, "--config", cfg_path, "--half",
                               "--tokenizer-dir", tok_dir, "--out", os.path.join(out, "hpsv2")])
    expected.update(hpsv2_scores=hps_scores.double(), pixels_hpsv2=px_hps)

    # Preprocessing goldens on the 150x97 'photo' (downscale) and the 23x17 'tiny' (upscale).
    photo = Image.open(os.path.join(out, "images", "photo.png")).convert("RGB")
    tiny = Image.open(os.path.join(out, "images", "tiny.png")).convert("RGB")
    for mode, fn in PRE.items():
        # 58 and 45 leave an odd crop margin of 4k+3 (31, 15): HF floors, torchvision rounds.
        expected[f"pre_{mode}_photo58"] = fn(photo, 58).contiguous()
        expected[f"pre_{mode}_tiny45"] = fn(tiny, 45).contiguous()
    ref64 = reference_pixels_hf(photo, 64)
    # What the torchvision-backend HF processor (transformers 5's default CLIPImageProcessor)
    # gives instead of the PIL one, for the record.
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor

    tvp = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    tv_px = tvp(images=photo, return_tensors="pt").pixel_values[0]
    notes.append("transformers-5 torchvision-backend CLIPImageProcessor vs PIL one on photo->64: "
                 f"max |diff| = {(tv_px - ref64).abs().max().item():.4f}")

    expected = {k: v.clone().contiguous() for k, v in expected.items()}
    save_file(expected, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("# Scorer golden fixtures\n\nGenerated by `tests/interop/make_scorer_fixtures.py` "
                f"(torch {torch.__version__}, open_clip {open_clip.__version__}, "
                f"transformers {__import__('transformers').__version__}, Pillow {Image.__version__}); "
                "see its docstring for what each file is.\n\n"
                f"Prompts: {PROMPTS}; images: {IMAGE_OF_PROMPT}.\n\n")
        for k in ("pickscore", "clip_score", "aesthetic", "hpsv2"):
            f.write(f"* {k} scores: {expected[k + '_scores'].tolist()}\n")
        for n in notes:
            f.write(f"* {n}\n")
    for k in ("pickscore", "clip_score", "aesthetic", "hpsv2"):
        print(k, expected[k + "_scores"].tolist())
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
