"""An independent reference: a plan's token drops expressed as attention masks and
position ids on the *unpatched* model, run layer by layer with its own modules.

A physically reduced forward must equal this at every surviving row.
"""

from __future__ import annotations

import torch

import vtc
from vtc import ops


def survivors(model, input_ids: torch.Tensor, plan: vtc.Plan, kept: dict,
              video_grid_thw: torch.Tensor | None = None) -> list[tuple[int, list, bool]]:
    """Per stage: (first LLM layer it affects, each sample's surviving rows of ``input_ids``, compact?).

    ``kept`` is ``vtc.stats(model).kept``: surviving grid indices of each image, in order.
    ``video_grid_thw``: the videos' grids, which say how many runs of placeholders make one video (Qwen3-VL
    gives a run per temporal group).
    """
    token = model.config.image_token_id
    image_runs = ops.runs(input_ids == token)
    video = getattr(model.config, "video_token_id", None)
    visual = input_ids == token
    if video is not None:  # videos (Qwen2.5-VL, Qwen3-VL) come after the images, in order
        sizes = None if video_grid_thw is None else (video_grid_thw.prod(-1) // 4).tolist()
        videos, lacking = [], 0  # lacking: tokens the current video has not had yet
        for b, run in ops.runs(input_ids == video):
            if lacking:
                videos[-1] = (b, torch.cat([videos[-1][1], run]))
            else:
                videos.append((b, run))
                lacking = sizes[len(videos) - 1] if sizes else run.numel()
            lacking -= run.numel()
        image_runs += videos
        visual = visual | (input_ids == video)
    out = []
    for stage in plan.stages:
        if stage.where not in kept:  # skipped: it kept every token
            continue
        rows = [(~visual[b]).nonzero()[:, 0] for b in range(input_ids.shape[0])]
        for (b, placeholders), grid in zip(image_runs, kept[stage.where], strict=True):
            rows[b] = torch.cat([rows[b], placeholders[grid]])
        out.append((stage.layer or 0, [r.sort().values for r in rows], stage.positions == "compact"))
    return out


@torch.no_grad()
def reference_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    stages: list[tuple[int, list, bool]],
    position_ids: torch.Tensor | None = None,
    vision_embeds: torch.Tensor | None = None,
    prompt: int | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    **image_inputs,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of every row ``[B, P, V]`` and each sample's rows surviving all stages.

    Rows after ``prompt`` (generated tokens) are always kept; ``stages`` refer to prompt rows
    only, so pass the prompt's stages with a longer ``input_ids``. A method that merges or
    pools before the LLM changes features, not only rows: ``vision_embeds`` (the LLM input the
    patched model built, ``[B, n, D]``, left-padded where samples kept fewer rows) replaces
    the rows surviving the first stage, so the reference checks everything after the
    reduction itself; for a DeepStack model (Qwen3-VL) it is a dict of the LLM's ``inputs_embeds``,
    ``visual_pos_masks`` and ``deepstack_visual_embeds``, whose reduced DeepStack features replace
    the full model's at those rows too (without a vision stage the full model's are used, at every
    row a layer stage keeps). ``image_inputs``: what else the image encoder takes (``image_sizes``).
    """
    lm = model.model.language_model
    bsz, total = input_ids.shape
    prompt = total if prompt is None else prompt
    embeds = model.model.get_input_embeddings()(input_ids)
    encoded = model.model.get_image_features(pixel_values=pixel_values, **image_inputs)
    feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in encoded.pooler_output])
    image = input_ids == model.config.image_token_id
    image[:, prompt:] = False  # the prompt's; a generated one is a plain token
    embeds = embeds.masked_scatter(image.unsqueeze(-1), feats.to(embeds.dtype))
    # Qwen3-VL's DeepStack: per DeepStack layer, the features to add to every row after it ([B, P, D], 0 at text).
    deep = [torch.zeros_like(embeds).masked_scatter(image.unsqueeze(-1), torch.cat(list(f)).to(embeds.dtype))
            for f in getattr(encoded, "deepstack_features", None) or ()]
    if pixel_values_videos is not None:  # Qwen2.5-VL's and Qwen3-VL's videos
        encoded = model.model.get_video_features(  # LLaVA-OneVision's takes no grid
            pixel_values_videos, **({} if video_grid_thw is None else {"video_grid_thw": video_grid_thw}))
        feats = torch.cat(list(encoded.pooler_output))
        video = input_ids == model.config.video_token_id
        video[:, prompt:] = False
        embeds = embeds.masked_scatter(video.unsqueeze(-1), feats.to(embeds.dtype))
        deep = [d.masked_scatter(video.unsqueeze(-1), torch.cat(list(f)).to(embeds.dtype))
                for d, f in zip(deep, getattr(encoded, "deepstack_features", None) or (), strict=True)]
    recorded = None
    if isinstance(vision_embeds, dict):  # a DeepStack model: the LLM's input embeddings and DeepStack arguments
        recorded, vision_embeds = vision_embeds, vision_embeds["inputs_embeds"]
    if recorded is not None and stages and stages[0][0] == 0:
        # The DeepStack features the patched model reduced with the tokens, at the rows the vision stages kept.
        mask = recorded["visual_pos_masks"]
        for d, reduced in zip(deep, recorded["deepstack_visual_embeds"], strict=True):
            full = torch.zeros(*mask.shape, d.shape[-1], dtype=d.dtype)
            full[mask] = reduced.to(d.dtype)
            for b, rows in enumerate(stages[0][1]):
                d[b] = 0
                d[b, rows] = full[b, full.shape[1] - rows.numel():]
    if vision_embeds is not None and stages and stages[0][0] == 0:
        embeds = embeds.clone()
        for b, rows in enumerate(stages[0][1]):
            embeds[b, rows] = vision_embeds[b, vision_embeds.shape[1] - rows.numel():]
    pos = torch.arange(total)[None].expand(bsz, -1) if position_ids is None else position_ids.clone()
    mrope = hasattr(model.model, "get_rope_index")
    if mrope and position_ids is None:
        # Qwen2.5-VL: the 3-D M-RoPE positions of the whole original sequence (rows after the prompt are text).
        types = mm_token_type_ids.clone()
        types = torch.cat([types, types.new_zeros(bsz, total - types.shape[1])], dim=1)
        types[:, prompt:] = 0
        pos, _ = model.model.get_rope_index(input_ids, types, image_grid_thw=image_inputs.get("image_grid_thw"),
                                            video_grid_thw=video_grid_thw, attention_mask=attention_mask)

    # Which rows each layer may attend to, and the RoPE positions it uses.
    alive = torch.ones(bsz, total, dtype=torch.bool)
    schedule = {0: (alive, pos)}
    for start, rows, compact in stages:
        now = torch.zeros_like(alive)
        for b, r in enumerate(rows):
            now[b, r] = True
        now[:, prompt:] = True  # generated rows are always kept
        dropped = (alive & ~now).long()
        if compact:
            pos = pos - (dropped.cumsum(dim=1) - dropped)
        alive = now
        schedule[start] = (alive, pos)

    neg = torch.finfo(embeds.dtype).min
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    h = embeds
    for i, layer in enumerate(lm.layers):
        if i in schedule:
            keys, cur_pos = schedule[i]
            allowed = causal[None] & (keys & attention_mask.bool())[:, None, :]
            mask = torch.zeros(bsz, 1, total, total, dtype=embeds.dtype).masked_fill(~allowed[:, None], neg)
            cos_sin = lm.rotary_emb(h, cur_pos)
        h = layer(h, attention_mask=mask, position_embeddings=cos_sin, position_ids=None if mrope else cur_pos)
        if i < len(deep):  # the model adds them at its visual rows (here 0 elsewhere)
            h = h + deep[i]
    logits = model.lm_head(lm.norm(h))
    return logits, [alive[b].nonzero()[:, 0] for b in range(bsz)]


def llm_input(model, inputs, method: str, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """What the patched model hands the language model at prefill, and vtc's kept indices (stacked)."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"]) if not seen else None, with_kwargs=True)
    try:
        with vtc.compressed(model, method, **params), torch.no_grad():
            model(**inputs)
            kept = torch.stack(vtc.stats(model).kept["vision"])
    finally:
        hook.remove()
    return seen[0], kept
