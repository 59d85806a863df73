"""Shortened-sequence augmentation for the toy model's stage 3 (used by ``train_toy.py``).

Compression methods hand the language model *fewer* image tokens: a subset of the patches,
merged tokens (averages of similar or neighbouring patches), pooled grids, VisionZip's
[CLS] + dominant + contextual sequence; with positions re-indexed (compact) or kept. A
model trained only on full sequences (or with tokens hidden by the attention mask) learns
absolute positions inside the image span and fails on all of these. This module turns a
training batch into such shortened sequences.

Every image row is described by a weight matrix ``W`` of shape ``[k, 1 + N]`` over the
[CLS] feature (column 0) and the ``N`` patch features: a kept patch is a one-hot row, a
merged token a row of averaging weights, VisionZip's contextual token ``target + mean``.
The image tokens are then ``projector(W @ features)`` (merged before the projector, as
VisionZip and ToMe do) or ``W @ projector(features)`` (after it, as the one-shot reducers).

Example:
    >>> import random, torch
    >>> w, pos = subset_rows(torch.tensor([0, 5, 7]), 144)
    >>> w.shape, pos.tolist()
    (torch.Size([3, 145]), [0, 5, 7])
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch

GRID = 12  # the toy's 12 x 12 patches
IMAGE_START = 3  # <s> USER : <image>...


@dataclasses.dataclass
class RowSpec:
    """How one sequence's image span is rewritten."""

    w: torch.Tensor  # [k, 1 + N] weights over [CLS] + patches
    pos: torch.Tensor  # [k] patch index each token stands for (used when positions are kept)
    visible: torch.Tensor  # [k] bool: False = hidden by the attention mask (masking, not removal)
    keep_positions: bool = False
    pre_projector: bool = False


def subset_rows(keep: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot rows selecting patches ``keep`` (sorted, raster order) of ``n``."""
    keep = keep.sort().values
    w = torch.zeros(len(keep), n + 1)
    w[torch.arange(len(keep)), keep + 1] = 1.0
    return w, keep


def choose(rng: random.Random, gen: torch.Generator, shapes: torch.Tensor, k: int, biased: bool) -> torch.Tensor:
    """``k`` patch indices: uniform, or biased towards object patches (as scoring methods pick)."""
    score = torch.rand(shapes.shape[0], generator=gen)
    if biased:
        score = score + (shapes > 0).float() * rng.uniform(0.3, 1.5)
    return score.topk(k).indices


def assign(
    feats: torch.Tensor, targets: torch.Tensor, spatial: bool, grid: tuple[int, int] = (GRID, GRID)
) -> torch.Tensor:
    """Index into ``targets`` of the target each patch joins: most similar feature (cosine), or
    nearest in the ``(rows, cols)`` grid."""
    if spatial:
        yx = torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij"), -1).reshape(-1, 2)
        d = torch.cdist(yx.float(), yx[targets].float())
        return d.argmin(-1)
    f = torch.nn.functional.normalize(feats, dim=-1)
    return (f @ f[targets].T).argmax(-1)


def merge_rows(
    feats: torch.Tensor, targets: torch.Tensor, spatial: bool, grid: tuple[int, int] = (GRID, GRID)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every patch averaged into its target's group (size-weighted mean, as ToMe's merges
    end up): rows over ``[CLS] + patches`` in the targets' raster order."""
    targets = targets.sort().values
    group = assign(feats, targets, spatial, grid)
    group[targets] = torch.arange(len(targets))  # a target always stays in its own group
    n = feats.shape[0]
    w = torch.zeros(len(targets), n + 1)
    w[group, torch.arange(n) + 1] = 1.0
    return w / w.sum(-1, keepdim=True), targets


def pool_rows(side: int, grid: tuple[int, int] = (GRID, GRID)) -> tuple[torch.Tensor, torch.Tensor]:
    """Average pooling of the ``(rows, cols)`` grid (the toy's 12 x 12) to ``side x side`` (adaptive bins)."""
    rows_at = [round(i * grid[0] / side) for i in range(side + 1)]
    cols_at = [round(i * grid[1] / side) for i in range(side + 1)]
    rows, pos = [], []
    for i in range(side):
        for j in range(side):
            w = torch.zeros(grid)
            w[rows_at[i] : rows_at[i + 1], cols_at[j] : cols_at[j + 1]] = 1.0
            rows.append(torch.cat([torch.zeros(1), w.flatten() / w.sum()]))
            pos.append(rows_at[i] * grid[1] + cols_at[j])
    return torch.stack(rows), torch.tensor(pos)


def visionzip_rows(
    rng: random.Random, gen: torch.Generator, feats: torch.Tensor, shapes: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's sequence: [CLS], dominant patches (raster order), then contextual tokens,
    each ``target + mean(group)`` of the remaining patches (or the plain mean)."""
    n = feats.shape[0]
    contextual = max(1, round(k * 10 / 64))
    dominant = max(1, k - contextual - 1)
    dom = choose(rng, gen, shapes, dominant, biased=True).sort().values
    rest = torch.ones(n, dtype=torch.bool)
    rest[dom] = False
    rest_idx = rest.nonzero().squeeze(-1)
    step = max(1, len(rest_idx) // contextual)
    targets = rest_idx[torch.arange(contextual) * step][:contextual]
    others = rest_idx[~torch.isin(rest_idx, targets)]
    g = assign(feats, targets, spatial=False)[others]
    w_ctx = torch.zeros(len(targets), n + 1)
    for j in range(len(targets)):
        members = others[g == j]
        if len(members):
            w_ctx[j, members + 1] = 1.0 / len(members)
        if rng.random() < 0.5 or not len(members):
            w_ctx[j, targets[j] + 1] += 1.0  # official: target + mean of its group
        else:
            w_ctx[j] = w_ctx[j] * len(members) / (len(members) + 1)
            w_ctx[j, targets[j] + 1] += 1.0 / (len(members) + 1)
    w_dom, _ = subset_rows(dom, n)
    cls = torch.zeros(1, n + 1)
    cls[0, 0] = 1.0
    w = torch.cat([cls, w_dom, w_ctx])
    pos = torch.cat([torch.zeros(1, dtype=torch.long), dom, targets])
    return w, pos


def sample_k(rng: random.Random, n: int, low: float, high: float) -> int:
    """A kept count, log-uniform between fractions ``low`` and ``high`` of ``n``."""
    return max(4, min(n, round(n * math.exp(rng.uniform(math.log(low), math.log(high))))))


def row_spec(
    rng: random.Random, gen: torch.Generator, feats: torch.Tensor, shapes: torch.Tensor, mix: dict[str, float],
    low: float = 0.08, high: float = 0.75, kind: str | None = None, k: int | None = None,
    biased: bool | None = None, keep_positions: bool | None = None, pre: bool | None = None,
    grid: tuple[int, int] = (GRID, GRID), keep_share: float = 0.35,
) -> RowSpec:
    """One sequence's rewrite, drawn from ``mix`` (weights of the kinds below) unless ``kind``
    is given: ``full``; ``mask`` (hidden by the attention mask, positions unchanged);
    ``subset`` (dropped); ``merge`` (all patches merged into k groups); ``pool``; ``visionzip``.
    ``k``, ``biased`` (object-biased choice), ``keep_positions`` and ``pre`` (merge before the
    projector) are drawn unless given (for evaluation conditions; positions kept with probability
    ``keep_share``); ``grid`` is the image's ``(rows, cols)``."""
    n = feats.shape[0]
    kind = kind or rng.choices(list(mix), list(mix.values()))[0]
    k = k or sample_k(rng, n, low, high)
    draws = (rng.random() < 0.5, rng.random() < 0.5, rng.random() < keep_share, rng.random() < 0.5)
    biased = draws[0] if biased is None else biased
    spatial = draws[1]
    keep_positions = draws[2] if keep_positions is None else keep_positions
    pre = draws[3] if pre is None else pre
    if kind == "full":
        w, pos = subset_rows(torch.arange(n), n)
        return RowSpec(w, pos, torch.ones(n, dtype=torch.bool))
    if kind == "mask":
        w, pos = subset_rows(torch.arange(n), n)
        visible = torch.zeros(n, dtype=torch.bool)
        visible[choose(rng, gen, shapes, k, biased)] = True
        return RowSpec(w, pos, visible)
    if kind == "subset":
        w, pos = subset_rows(choose(rng, gen, shapes, k, biased), n)
    elif kind == "merge":
        w, pos = merge_rows(feats, choose(rng, gen, shapes, k, biased), spatial, grid)
    elif kind == "pool":
        w, pos = pool_rows(max(2, round(math.sqrt(k))), grid)
    elif kind == "visionzip":
        w, pos = visionzip_rows(rng, gen, feats, shapes, max(k, 6))
        keep_positions = False  # VisionZip's sequence only exists with re-indexed positions
    else:
        raise ValueError(f"unknown shortening kind {kind!r}")
    return RowSpec(w, pos, torch.ones(len(pos), dtype=torch.bool), keep_positions, pre)


def apply_specs(batch: dict, specs: list[RowSpec], image_id: int, pad_id: int) -> dict:
    """The physical batch for ``specs``: each row's image span replaced by its ``k`` tokens,
    text shifted, positions re-indexed or kept, the per-turn focus moved onto the new tokens.

    Adds ``w`` ``[B, K, 1 + N]``, ``pre`` ``[B]``, ``slots`` ``[B, T]`` (image token
    positions, row-major in the order of ``w``'s valid rows), ``valid`` ``[B, K]``,
    ``positions`` ``[B, T]`` and ``focus_seq`` ``[B, turns, T]``.
    """
    n = batch["feats"].shape[1]
    b, turns = batch["qpos"].shape
    lengths = batch["mask"].sum(-1).tolist()
    ks = [len(s.pos) for s in specs]
    width = max(ln - n + k for ln, k in zip(lengths, ks))
    kmax = max(ks)
    out = {
        "ids": torch.full((b, width), pad_id),
        "labels": torch.full((b, width), -100),
        "mask": torch.zeros((b, width), dtype=torch.long),
        "positions": torch.zeros((b, width), dtype=torch.long),
        "qpos": batch["qpos"] - n + torch.tensor(ks)[:, None],
        "named": torch.zeros((b, turns, width), dtype=torch.bool),
        "focus_seq": torch.zeros((b, turns, width), dtype=torch.bool),
        "slots": torch.zeros((b, width), dtype=torch.bool),
        "valid": torch.zeros((b, kmax), dtype=torch.bool),
        "w": torch.zeros((b, kmax, n + 1)),
        "pre": torch.tensor([s.pre_projector for s in specs]),
    }
    for r, (spec, ln, k) in enumerate(zip(specs, lengths, ks)):
        text = slice(IMAGE_START + n, ln)
        new_text = slice(IMAGE_START + k, ln - n + k)
        span = slice(IMAGE_START, IMAGE_START + k)
        out["ids"][r, :IMAGE_START] = batch["ids"][r, :IMAGE_START]
        out["ids"][r, span] = image_id
        out["ids"][r, new_text] = batch["ids"][r, text]
        out["labels"][r, new_text] = batch["labels"][r, text]
        out["mask"][r, : ln - n + k] = 1
        out["mask"][r, span] = spec.visible.long()
        if spec.keep_positions:
            out["positions"][r, :IMAGE_START] = torch.arange(IMAGE_START)
            out["positions"][r, span] = IMAGE_START + spec.pos
            out["positions"][r, new_text] = torch.arange(IMAGE_START + n, ln)
        else:
            out["positions"][r, : ln - n + k] = torch.arange(ln - n + k)
        out["named"][r, :, new_text] = batch["named"][r, :, text]
        members = spec.w[:, 1:] > 0  # [k, N]
        hit = (members.float() @ batch["focus"][r].T.float()).T > 0  # [turns, k]
        out["focus_seq"][r, :, span] = hit & spec.visible
        out["slots"][r, span] = True
        out["valid"][r, :k] = True
        out["w"][r, :k] = spec.w
    return out
