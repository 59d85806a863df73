"""See what a method keeps: the image with the surviving visual tokens of every stage.

Example:
    >>> show(method="vtc_cls", budget=16, out="kept.png")     # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

import vtc


def check_show(image: str | None, out: str | Path, model: str | None, method: str, budget, params: dict) -> str | None:
    """Refuse, one line each and before any weights load, what ``vtc show`` cannot do: an image
    that is missing or not an image, an output it cannot write, a model that is not a supported
    VLM, a method or budget that does not apply to it. Returns the image path.

    Example:
        >>> check_show("/no/such.jpg", "kept.png", None, "vtc_cls", 16, {})
        Traceback (most recent call last):
        ...
        vtc.errors.VtcError: --image /no/such.jpg: no such file
    """
    from PIL import Image, UnidentifiedImageError

    from vtc.errors import VtcError
    from vtc.eval.store import check_out_file
    from vtc.eval.sweep import _meta_model

    if image is not None:
        if not Path(image).is_file():
            raise VtcError(f"--image {image}: no such file")
        try:
            with Image.open(image) as im:
                im.verify()
        except (UnidentifiedImageError, OSError) as e:
            raise VtcError(f"--image {image} is not an image PIL can read ({e.__class__.__name__})") from None
    check_out_file(out, "picture", "kept.png")
    if model is None:
        from vtc.eval.toy import MODEL_PATH

        model = str(MODEL_PATH)
    vtc.plan(_meta_model(model), method, budget, **params)
    return image


@torch.no_grad()
def show(image=None, question: str | None = None, method: str = "vtc_cls", budget: int | float | None = None,
         model=None, processor=None, out: str | Path = "kept.png", max_new_tokens: int = 8, **params) -> str:
    """Draw ``image`` once per stage of ``method`` with the kept tokens highlighted and the
    model's answer in the title; returns the answer. Defaults: the toy model and a toy scene.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    if model is None:
        from vtc.eval import toy

        model, processor = toy.load()
    if image is None:
        from vtc.eval import toy

        record = toy.generate(1, seed=7)[0]
        image, question = record.image, question or record.question
    if isinstance(image, (str, Path)):
        image = Image.open(image).convert("RGB")
    question = question or "Describe the image."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with vtc.compressed(model, method, budget, **params):
        plan = vtc.plan(model, method, budget, **params)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        stats = vtc.stats(model)
    answer = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    n = plan.image_tokens
    side = math.isqrt(n)
    panels = [("input", None)] + [(s.where, stats.kept.get(s.where)) for s in plan.stages]
    shown = image
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (where, kept) in zip(axes[0], panels):
        ax.imshow(shown)
        ax.set_axis_off()
        if kept is None:
            ax.set_title(f"{where}: {n} tokens" if where == "input" else f"{where}: all kept", fontsize=9)
            continue
        mask = torch.zeros(n, dtype=torch.bool)
        mask[kept[0].cpu()] = True  # the first image
        grid = (~mask).view(side, side).float().numpy()
        ax.imshow(grid, cmap="gray_r", alpha=0.6 * grid, vmin=0, vmax=1, extent=(0, shown.width, shown.height, 0))
        ax.set_title(f"{where}: {int(mask.sum())} kept", fontsize=9)
    fig.suptitle(f"{method} @ {budget}: Q: {question}  A: {answer}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return answer
