#!/usr/bin/env python
"""Convert scorer checkpoints that ship as pickles into the safetensors folders `load_scorer` reads.

Run once per download (needs torch, safetensors, and open_clip_torch for `open_clip`):

  # HPSv2 (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt, an open_clip ViT-H-14 state dict)
  python scripts/convert_scorer_weights.py open_clip --checkpoint HPS_v2.1_compressed.pt \
      --model ViT-H-14 --out models/hpsv2
  # -> models/hpsv2/open_clip_config.json   (open_clip's model config: embed_dim, vision_cfg, text_cfg)
  #    models/hpsv2/open_clip_model.safetensors (the state dict, open_clip's own key names)
  #    models/hpsv2/tokenizer/{vocab.json, merges.txt, tokenizer_config.json} (open_clip's BPE)

  # LAION improved-aesthetic-predictor head (sac+logos+ava1-l14-linearMSE.pth), placed next to
  # the HF folder of openai/clip-vit-large-patch14 (config.json + model.safetensors):
  python scripts/convert_scorer_weights.py aesthetic \
      --checkpoint sac+logos+ava1-l14-linearMSE.pth --out models/clip-vit-large-patch14
  # -> models/clip-vit-large-patch14/aesthetic_mlp.safetensors (layers.{0,2,4,6,7}.{weight,bias})

PickScore (yuvalkirstain/PickScore_v1) and CLIP score (openai/clip-vit-large-patch14) are HF
folders that already carry model.safetensors: no conversion.

Key layout of open_clip_model.safetensors (read by src/models/open_clip.rs), open_clip's names:
  visual.conv1.weight [W, 3, P, P], visual.class_embedding [W], visual.positional_embedding [G*G+1, W],
  visual.ln_pre.{weight,bias}, visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight [3W, W],
  attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}.{weight,bias}, visual.ln_post,
  visual.proj [W, E]; token_embedding.weight [V, T], positional_embedding [L, T],
  transformer.resblocks.{i}.* (as above), ln_final, text_projection [T, E], logit_scale [].
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file


def load_state_dict(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # older pickles with extra objects
        if os.environ.get("ALLOW_PICKLE") != "1":
            sys.exit(f"{path}: cannot load with weights_only=True ({e}); if you trust the file, "
                     "rerun with ALLOW_PICKLE=1")
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        sys.exit(f"{path}: expected a state dict (or a dict with `state_dict`), got {type(obj)}")
    out = {}
    for k, v in obj.items():
        if not torch.is_tensor(v):
            continue
        for prefix in ("module.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v.detach().contiguous()
    return out


def write_open_clip_tokenizer(model_name, context_length, out_dir):
    import open_clip

    tok = open_clip.get_tokenizer(model_name)
    if not (hasattr(tok, "encoder") and hasattr(tok, "bpe_ranks")):
        sys.exit(f"{model_name}: tokenizer {type(tok).__name__} is not open_clip's SimpleTokenizer; "
                 "copy the HF tokenizer folder of the model to <out>/tokenizer instead")
    os.makedirs(out_dir, exist_ok=True)
    # open_clip 3.x names the special tokens <start_of_text> / <end_of_text>; the ids are
    # OpenAI's (49406, 49407), so write them under the names CLIP tokenizer files use.
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in tok.encoder.items()}
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for (a, b), _ in merges:
            f.write(f"{a} {b}\n")
    # open_clip pads with id 0 (`!`); with the causal mask padding never reaches the pooled token.
    cfg = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",
        "model_max_length": context_length,
        "tokenizer_class": "CLIPTokenizer",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def convert_open_clip(args):
    sd = load_state_dict(args.checkpoint)
    if args.config:
        with open(args.config) as f:
            cfg = json.load(f)
    else:
        import open_clip

        cfg = open_clip.get_model_config(args.model)
        if cfg is None:
            sys.exit(f"open_clip has no model config named {args.model}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "open_clip_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    if args.half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    save_file(sd, os.path.join(args.out, "open_clip_model.safetensors"))
    tok_dir = os.path.join(args.out, "tokenizer")
    if args.tokenizer_dir:
        import shutil

        shutil.copytree(args.tokenizer_dir, tok_dir, dirs_exist_ok=True)
    elif not args.no_tokenizer:
        write_open_clip_tokenizer(args.model, cfg.get("text_cfg", {}).get("context_length", 77), tok_dir)
    print(f"wrote {args.out}: {len(sd)} tensors")


def convert_aesthetic(args):
    sd = load_state_dict(args.checkpoint)
    keep = {k: v.float() for k, v in sd.items() if k.startswith("layers.")}
    if not keep:
        sys.exit(f"{args.checkpoint}: no `layers.*` tensors (expected the improved-aesthetic-predictor MLP)")
    os.makedirs(args.out, exist_ok=True)
    save_file(keep, os.path.join(args.out, "aesthetic_mlp.safetensors"))
    print(f"wrote {os.path.join(args.out, 'aesthetic_mlp.safetensors')}: {sorted(keep)}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("open_clip", help="open_clip checkpoint (HPSv2) -> open_clip_model.safetensors")
    o.add_argument("--checkpoint", required=True)
    o.add_argument("--model", default="ViT-H-14", help="open_clip model name for the config and tokenizer")
    o.add_argument("--config", help="an open_clip model config JSON instead of --model's")
    o.add_argument("--out", required=True)
    o.add_argument("--half", action="store_true", help="store float tensors as f16 (loaded as f32)")
    o.add_argument("--tokenizer-dir", help="copy this tokenizer folder instead of exporting open_clip's")
    o.add_argument("--no-tokenizer", action="store_true")
    a = sub.add_parser("aesthetic", help="improved-aesthetic-predictor .pth -> aesthetic_mlp.safetensors")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--out", required=True, help="the HF CLIP ViT-L/14 folder")
    args = p.parse_args()
    {"open_clip": convert_open_clip, "aesthetic": convert_aesthetic}[args.cmd](args)


if __name__ == "__main__":
    main()
