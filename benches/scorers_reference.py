#!/usr/bin/env python
"""PyTorch counterpart of benches/scorers.rs: transformers CLIPModel with random weights in the
ViT-L/14 (aesthetic, CLIP score) or ViT-H/14 (PickScore, HPSv2) shapes, the PIL CLIP processor on
512x512 images, f32 on the CPU.

    /work/pyenv/bin/python benches/scorers_reference.py [vit-l|vit-h|all] [batch] [reps] [threads]
"""
import sys
import time

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ARCHS = {
    "vit-l": dict(vision=(1024, 4096, 24, 16), text=(768, 3072, 12, 12), proj=768, act="quick_gelu"),
    "vit-h": dict(vision=(1280, 5120, 32, 16), text=(1024, 4096, 24, 16), proj=1024, act="gelu"),
}


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "vit-l"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}")
    x, y = np.mgrid[0:512, 0:512]
    imgs = []
    for i in range(batch):
        a = np.stack([(y * 7 + x * 3 + i * 11) % 256, (x ^ y) % 256,
                      (np.sin(y / 9.0) * 120 + 128).astype(np.int64)], -1).astype(np.uint8)
        imgs.append(Image.fromarray(a, "RGB"))
    proc = CLIPImageProcessorPil()
    t = time.perf_counter()
    for _ in range(reps):
        px = proc(images=imgs, return_tensors="pt").pixel_values
    pre = (time.perf_counter() - t) / reps
    print(f"preprocess {batch} x 512x512 -> 224 (PIL processor): {pre * 1e3:.1f} ms/batch")
    tok = CLIPTokenizer.from_pretrained("tests/fixtures/tiny-sd/tokenizer")
    ids = tok([f"a photo of a cat number {i}, highly detailed" for i in range(batch)],
              padding="max_length", max_length=77, return_tensors="pt").input_ids
    for name, a in ARCHS.items():
        if which not in ("all", name):
            continue
        (vh, vi, vl, vn), (th, ti, tl, tn) = a["vision"], a["text"]
        cfg = CLIPConfig(
            text_config=dict(hidden_size=th, intermediate_size=ti, num_hidden_layers=tl, num_attention_heads=tn,
                             hidden_act=a["act"], eos_token_id=2),
            vision_config=dict(hidden_size=vh, intermediate_size=vi, num_hidden_layers=vl, num_attention_heads=vn,
                               patch_size=14, image_size=224, hidden_act=a["act"]),
            projection_dim=a["proj"])
        t = time.perf_counter()
        m = CLIPModel(cfg).eval()
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.0f} M params, built in "
              f"{time.perf_counter() - t:.1f} s")

        def run():
            with torch.no_grad():
                i = m.get_image_features(pixel_values=px)
                tx = m.get_text_features(input_ids=ids)
                i = getattr(i, "pooler_output", i)
                tx = getattr(tx, "pooler_output", tx)
                return torch.nn.functional.cosine_similarity(i, tx)

        run()
        t = time.perf_counter()
        for _ in range(reps):
            run()
        s = (time.perf_counter() - t) / reps
        print(f"{name}: score batch {batch} (image + text towers): {s:.2f} s/batch, {s / batch:.2f} s/image; "
              f"with preprocessing {batch / (s + pre):.2f} images/s")


if __name__ == "__main__":
    main()
