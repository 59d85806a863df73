"""What a serving engine needs to run a pre-LLM plan on LLaVA images, without knowing the engine.

An engine that sizes each image's placeholders before the model runs (vLLM) can serve a plan
whose stages all run before the LLM: the prompt gets as many placeholders as the plan keeps,
and the model's image-embedding step returns that many features. :func:`serve_plan` compiles
the plan from the checkpoint's config and refuses the rest with the reason;
:func:`tower_signals` turns what the engine's vision tower computed into the per-patch signals
the stages read; :func:`reduce_image` runs the stages through :func:`vtc.reduce.reduce_vision`,
the code the Hugging Face path runs (``patches/base.py``), so both give the same tokens.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import torch

from vtc import ops
from vtc.errors import UnsupportedConfigurationError, VtcError
from vtc.plan import Plan, Stage
from vtc.reduce import reduce_vision, resized

# Reducers a served plan may use: each reduces one image's features after the tower.
SERVED_REDUCERS = ("topk", "pool", "merge", "divprune", "dominant+context", "vispruner", "downsample")

# Why the reducers vLLM cannot run are refused (docs/serving.md).
REFUSED = {
    "tome": "it merges inside the vision tower's layers, which vtc does not patch in vLLM; use merge",
    "cdpruner": (
        "it weighs tokens by the instruction, and vLLM encodes an image apart from its prompt (the image's "
        "inputs are processed and its features cached by a hash of the image alone, and shared by every "
        "request that shows it); use vispruner or divprune, or the Hugging Face path"
    ),
}


@dataclasses.dataclass(frozen=True)
class ServePlan:
    """A compiled plan and the tower signals its stages read.

    Example:
        >>> from transformers import AutoConfig
        >>> from vtc.eval import toy
        >>> sp = serve_plan(AutoConfig.from_pretrained(toy.MODEL_PATH), "visionzip", 48)
        >>> sp.keep, sp.tower_layers, sp.needs_hidden
        (48, (3,), True)
    """

    plan: Plan
    stages: tuple[Stage, ...]  # the vision stages that run (a stage keeping every token is skipped)
    image_tokens: int  # features per image before the stages
    cls_sets: tuple[tuple[int, ...], ...]  # each set of vision layers whose [CLS] rows a stage averages
    key_layers: tuple[int, ...]  # vision layers whose keys a stage merges by
    mean_key_layers: tuple[int, ...]  # ... whose keys averaged over heads (VisionZip)
    needs_hidden: bool  # a stage reduces the projector's input (VisionZip on LLaVA-1.5)
    grid: tuple[int, int] | None = None  # downsample: the patch grid the resized image gives (rows, cols)

    @property
    def keep(self) -> int:
        """Features per image the LLM receives: the placeholder count."""
        return self.count(self.image_tokens)

    def count(self, n: int) -> int:
        """Features the LLM receives for an image whose tower gives ``n`` (downsample: its grid's)."""
        if self.grid is not None:
            return self.grid[0] * self.grid[1]
        return self.plan.keeps_for(n)[-1] if self.stages else n

    @property
    def tower_layers(self) -> tuple[int, ...]:
        """Vision layers whose attention input the signals are computed from."""
        layers = {i for s in self.cls_sets for i in s} | set(self.key_layers) | set(self.mean_key_layers)
        return tuple(sorted(layers))


def serve_plan(config, method: str, budget: int | float | None = None, **params) -> ServePlan:
    """Compile ``method`` for a LLaVA checkpoint's ``config`` (a transformers config) as a served plan.

    Raises :class:`~vtc.errors.UnsupportedConfigurationError` for what an engine with paged
    attention cannot run: stages inside the LLM (each layer would keep its own number of cache
    rows), merging inside the tower (``tome``), original positions (``positions="keep"``).

    Example:
        >>> from transformers import AutoConfig
        >>> from vtc.eval import toy
        >>> serve_plan(AutoConfig.from_pretrained(toy.MODEL_PATH), "vtc_cls", 1 / 3).keep
        48
    """
    from vtc.api import plan as compile_plan

    if getattr(config, "model_type", None) != "llava":
        raise UnsupportedConfigurationError(
            f"vtc's vLLM plugin serves LLaVA-1.5-style checkpoints (model_type 'llava'), not "
            f"{getattr(config, 'model_type', None)!r}: use the Hugging Face path (vtc.apply) for other families"
        )
    if getattr(config, "vision_feature_select_strategy", "default") != "default" or not isinstance(
            getattr(config, "vision_feature_layer", -2), int):
        raise UnsupportedConfigurationError(
            "vtc's vLLM plugin serves LLaVA checkpoints whose features are one layer's patch tokens "
            "(vision_feature_select_strategy 'default', one vision_feature_layer), as LLaVA-1.5's"
        )
    the_plan = compile_plan(types.SimpleNamespace(config=config), method, budget, **params)
    inside = [s.where for s in the_plan.stages if s.layer is not None]
    if inside:
        raise UnsupportedConfigurationError(
            f"{method} prunes inside the LLM ({', '.join(inside)}): under paged attention every layer holds the "
            f"same cache rows, so per-layer token counts cannot be served; use a pre-LLM method (vtc_cls, "
            f"visionzip, vispruner, random, pool, merge, divprune, downsample) or the Hugging Face path"
        )
    reaching = [the_plan.image_tokens, *(s.keep for s in the_plan.stages)]
    stages = tuple(s for s, n in zip(the_plan.stages, reaching) if s.keep < n)
    for s in stages:
        if s.reducer not in SERVED_REDUCERS or dict(s.options).get("official"):
            raise UnsupportedConfigurationError(
                f"{method}'s {s.reducer_label} stage cannot be served: "
                + (REFUSED.get(s.reducer) or f"the plugin runs the reducers {', '.join(SERVED_REDUCERS)}")
            )
        if s.reducer == "downsample" and getattr(config.vision_config, "model_type", None) != "clip_vision_model":
            raise UnsupportedConfigurationError(
                f"{method}: the plugin interpolates the position embeddings of CLIP towers only, not "
                f"{getattr(config.vision_config, 'model_type', None)!r}; use the Hugging Face path (vtc.apply)"
            )
        if s.positions != "compact":
            raise UnsupportedConfigurationError(
                f"{method} with positions={s.positions!r}: a served prompt numbers the kept placeholders "
                f"consecutively; use positions='compact'"
            )
        if s.scorer.kind not in ("random", "cls_attention", "none"):
            raise UnsupportedConfigurationError(f"{method}: the plugin cannot compute the {s.scorer.kind} scorer")
    scorers = [t for s in stages for t in (s.scorer, s.metric) if t is not None]
    grid = None
    if any(s.reducer == "downsample" for s in stages):  # the tower gives the grid's tokens (patches/llava.py)
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        grid = ops.downsampled_grid(side, side, the_plan.keeps_for(side * side)[0])
    return ServePlan(
        plan=the_plan,
        stages=stages,
        image_tokens=the_plan.image_tokens,
        cls_sets=tuple(sorted({t.layers for t in scorers if t.kind == "cls_attention"})),
        key_layers=tuple(sorted({t.layers[0] for t in scorers if t.kind == "keys"})),
        mean_key_layers=tuple(sorted({t.layers[0] for t in scorers if t.kind == "mean_keys"})),
        needs_hidden=any(dict(s.options).get("pre") for s in stages),
        grid=grid,
    )


def tower_signals(
    sp: ServePlan, attention: dict[int, tuple[object, torch.Tensor]], hidden: torch.Tensor | None, heads: int
) -> dict[str, torch.Tensor]:
    """Per-patch signals of a batch of images, as ``patches/base.py`` records them.

    ``attention`` maps each of ``sp.tower_layers`` to ``(module, input)``: a CLIP-style attention
    module (``q_proj``, ``k_proj``, ``head_dim``, ``scale``) and the hidden states it received
    ``[B, 1 + P, C]`` ([CLS] first). ``hidden``: the projector's input ``[B, 1 + P, C]`` where
    ``sp.needs_hidden``. Returns ``{name: [B, P, ...]}`` ([CLS] dropped, LLaVA's default strategy).

    Example:
        >>> tower_signals(ServePlan(None, (), 4, (), (), (), False), {}, None, 1)
        {}
    """
    out: dict[str, torch.Tensor] = {}
    rows = {i: ops.cls_attention(*attention[i]) for s in sp.cls_sets for i in s}
    for layers in sp.cls_sets:
        out[f"cls{layers}"] = torch.stack([rows[i] for i in layers]).mean(dim=0)[:, 1:]
    for i in sp.key_layers:
        module, x = attention[i]
        out[f"keys{i}"] = module.k_proj(x)[:, 1:]
    for i in sp.mean_key_layers:
        module, x = attention[i]
        keys = module.k_proj(x)
        out[f"mean_keys{i}"] = keys.view(*keys.shape[:-1], heads, -1).mean(dim=-2)[:, 1:]
    if sp.needs_hidden:
        if hidden is None:
            raise VtcError("this plan reduces the projector's input: pass the tower's features before the projector")
        out["hidden"] = hidden[:, 1:]
        out["cls_hidden"] = hidden[:, :1].expand_as(hidden)[:, 1:]
    return out


def interpolated_embeddings(embeddings, pixels: torch.Tensor) -> torch.Tensor:
    """A CLIP tower's input embeddings ``[B, 1 + h * w, C]`` for images ``[B, 3, H, W]`` of any size
    (``downsample``): the patch position embeddings resized (bicubic) to the ``h x w`` patch grid, as
    transformers' ``CLIPVisionEmbeddings.interpolate_pos_encoding``. ``embeddings``: a CLIP embeddings
    module (``patch_embedding``, ``class_embedding``, ``position_embedding``, ``patch_size``), vLLM's or
    transformers'.

    Example:
        >>> from transformers import CLIPVisionConfig
        >>> from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
        >>> config = CLIPVisionConfig(hidden_size=8, num_attention_heads=2, image_size=12, patch_size=4)
        >>> emb = CLIPVisionEmbeddings(config)
        >>> interpolated_embeddings(emb, torch.randn(1, 3, 8, 12)).shape
        torch.Size([1, 7, 8])
    """
    weight = embeddings.patch_embedding.weight
    patches = embeddings.patch_embedding(pixels.to(weight.dtype)).flatten(2).transpose(1, 2)
    x = torch.cat([embeddings.class_embedding.expand(pixels.shape[0], 1, -1).to(patches.dtype), patches], dim=1)
    table = embeddings.position_embedding.weight
    side, rows, cols = round((table.shape[0] - 1) ** 0.5), *(d // embeddings.patch_size for d in pixels.shape[-2:])
    if rows == cols == side:  # transformers keeps the table as it is at the trained size
        return x + table[None]
    grid = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    return x + torch.cat([table[None, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


def downsampled_pixels(sp: ServePlan, pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The processed images ``[B, 3, H, W]`` resized to ``sp.grid`` (bicubic, antialiased), as the
    Hugging Face path resizes them (``patches/llava.py``).

    Example:
        >>> downsampled_pixels(ServePlan(None, (), 9, (), (), (), False, (2, 3)), torch.ones(1, 3, 6, 6), 2).shape
        torch.Size([1, 3, 4, 6])
    """
    rows, cols = sp.grid
    return ops.resize_images(pixels, rows * patch_size, cols * patch_size)


def reduce_image(
    sp: ServePlan, feats: torch.Tensor, signals: dict[str, torch.Tensor],
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the plan's vision stages on one image's projected features ``[n, D]`` and its
    ``signals`` (``{name: [n, ...]}``, from :func:`tower_signals`); ``project`` maps the
    projector's input to features (stages with ``pre``). Returns the kept features ``[k, D]`` and
    which of the ``n`` tokens each stands for ``[k]`` (as ``Installation._reduce_images``).

    Example:
        >>> from vtc.plan import Scorer
        >>> plan = Plan("pool", (Stage("vision", Scorer("none"), 4, reducer="pool"),), 16, 2)
        >>> sp = ServePlan(plan, plan.stages, 16, (), (), (), False)
        >>> reduce_image(sp, torch.randn(16, 8), {})[1]
        tensor([ 5,  7, 13, 15])
    """
    n = feats.shape[0]
    index = torch.arange(n, device=feats.device)
    keeps = sp.plan.keeps_for(n)
    first = sp.plan.stages.index(sp.stages[0]) if sp.stages else 0
    for j, stage in enumerate(sp.stages):
        k = keeps[first + j]
        if k >= feats.shape[0]:
            continue
        scores = metric = None
        if stage.scorer.kind == "random":
            gen = torch.Generator().manual_seed(stage.scorer.seed)
            scores = torch.rand(n, generator=gen).to(feats.device)[index][None]
        elif stage.scorer.kind == "cls_attention":
            scores = signals[f"cls{stage.scorer.layers}"][index][None]
        if stage.metric is not None and stage.metric.kind in ("keys", "mean_keys"):
            metric = signals[f"{stage.metric.kind}{stage.metric.layers[0]}"][index][None]
        elif stage.metric is not None and stage.metric.kind == "cls_attention":
            metric = signals[f"cls{stage.metric.layers}"][index][None]
        options = dict(stage.options)
        pre = bool(options.get("pre"))
        cls = signals["cls_hidden"][:1] if options.get("cls") else None
        x = signals["hidden"][index][None] if pre else feats[None]
        reduced, local = reduce_vision(resized(stage, k), x, scores, metric, cls=cls)
        if pre:
            if project is None:
                raise VtcError(f"stage {stage.reducer_label} reduces the projector's input: pass project")
            reduced = project(reduced).to(feats.dtype)
        feats, index = reduced[0], index[local[0]]
    return feats, index
