"""How much of a scene the toy's background tokens carry: a linear probe from the mean of the LLM-input image
features of the background tokens at least two tokens from any object to the scene's color-shape pairs
(which are present). A tower that spreads the objects over the background makes random pruning look free
(docs/toy-benchmark.md, "A leak, found and fixed").

    python scripts/toy_background_probe.py --family llava
    python scripts/toy_background_probe.py --family qwen2_5_vl --path eval/toy/model-qwen
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
import torch.nn.functional as F
from train_toy import pair_targets  # scripts/train_toy.py, beside this file

from vtc.eval import toy
from vtc.eval.toy import scenes


@torch.no_grad()
def background_means(model, processor, scs: list, batch: int = 50) -> torch.Tensor:
    """``[scenes, D]``: per scene, the mean LLM-input feature of its tokens two or more tokens from any object."""
    out = []
    for start in range(0, len(scs), batch):
        chunk = scs[start : start + batch]
        enc = processor.image_processor([scenes.render(s) for s in chunk], return_tensors="pt")
        extra = {"image_grid_thw": enc["image_grid_thw"]} if "image_grid_thw" in enc else {}
        feats = model.get_image_features(enc["pixel_values"], **extra, return_dict=True).pooler_output
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        else:  # Qwen: the images' tokens concatenated
            feats = feats.view(len(chunk), -1, feats.shape[-1])
        for scene, f in zip(chunk, feats, strict=True):
            g = scene.size // scenes.PATCH_SIZE
            objects = torch.from_numpy(scenes.patch_labels(scene)[1] > 0).float().view(1, 1, g, g)
            far = ~(F.max_pool2d(objects, 5, 1, 2).flatten() > 0)
            out.append(f[far].mean(0) if far.any() else torch.zeros(f.shape[-1]))
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llava", choices=sorted(toy.MODEL_PATHS))
    p.add_argument("--path", default=None, help="a toy model folder (default: the shipped one)")
    p.add_argument("--n", type=int, default=3000, help="scenes (4/5 to fit the probe, 1/5 to test it)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, processor = toy.load(args.path, family=args.family)
    rng = random.Random("background-probe")
    scs = [scenes.make_scene(rng) for _ in range(args.n)]
    x = background_means(model, processor, scs)
    y = torch.from_numpy(np.stack([pair_targets(s) for s in scs]))
    fit = int(0.8 * len(scs))
    probe = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(probe.parameters(), 1e-2)
    for _ in range(300):
        loss = F.binary_cross_entropy_with_logits(probe(x[:fit]), y[:fit])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        said, present = probe(x[fit:]) > 0, y[fit:] > 0.5
    recovered, false = float(said[present].float().mean()), float(said[~present].float().mean())
    print(f"{args.family} ({args.path or 'shipped'}): pairs present recovered {recovered:.3f}, "
          f"absent pairs said present {false:.3f} ({len(scs) - fit} held-out scenes)")


if __name__ == "__main__":
    main()
