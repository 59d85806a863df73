"""An independent reference: a plan's token drops expressed as attention masks and
position ids on the *unpatched* model, run layer by layer with its own modules.

A physically reduced forward must equal this at every surviving row.
"""

from __future__ import annotations

import torch

import vtc


def survivors(model, input_ids: torch.Tensor, plan: vtc.Plan, kept: dict) -> list[tuple[int, torch.Tensor, bool]]:
    """Per stage: (first LLM layer it affects, surviving rows of ``input_ids`` [B, n], compact?).

    ``kept`` is ``vtc.stats(model).kept``: surviving grid indices per image, ``[B, images, k]``.
    """
    image = input_ids == model.config.image_token_id
    bsz = input_ids.shape[0]
    placeholders = image.nonzero()[:, 1].view(bsz, -1)
    text = (~image).nonzero()[:, 1].view(bsz, -1)
    n = plan.image_tokens
    out = []
    for stage in plan.stages:
        if stage.where not in kept:  # skipped: it kept every token
            continue
        grid = kept[stage.where]  # [B, images, k]
        offsets = torch.arange(grid.shape[1])[None, :, None] * n
        image_rows = placeholders.gather(1, (grid + offsets).view(bsz, -1))
        rows = torch.cat([text, image_rows], dim=1).sort(dim=1).values
        out.append((stage.layer or 0, rows, stage.positions == "compact"))
    return out


@torch.no_grad()
def reference_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    stages: list[tuple[int, torch.Tensor, bool]],
    position_ids: torch.Tensor | None = None,
    vision_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every row ``[B, P, V]`` and the rows surviving all stages ``[B, n]``.

    Rows appended after the prompt (generated tokens) are always kept; ``stages`` refer to
    prompt rows only, so pass the prompt's stages with a longer ``input_ids``. A method that
    merges or pools before the LLM changes features, not only rows: ``vision_embeds`` (the
    LLM input the patched model built, ``[B, n, D]``) replaces the rows surviving the first
    stage, so the reference checks everything after the reduction itself.
    """
    lm = model.model.language_model
    bsz, total = input_ids.shape
    embeds = model.model.get_input_embeddings()(input_ids)
    feats = torch.cat(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
    image = input_ids == model.config.image_token_id
    image &= image.cumsum(dim=1) <= feats.shape[0] // bsz  # the prompt's; a generated one is a plain token
    image = image.unsqueeze(-1)
    embeds = embeds.masked_scatter(image, feats.to(embeds.dtype))
    if vision_embeds is not None and stages and stages[0][0] == 0:
        rows = stages[0][1]
        embeds = embeds.clone()
        embeds.scatter_(1, rows[..., None].expand(-1, -1, embeds.shape[-1]), vision_embeds[:, : rows.shape[1]])
    pos = torch.arange(total)[None].expand(bsz, -1) if position_ids is None else position_ids.clone()

    # Which rows each layer may attend to, and the RoPE positions it uses.
    alive = torch.ones(bsz, total, dtype=torch.bool)
    schedule = {0: (alive, pos)}
    for start, rows, compact in stages:
        now = torch.zeros_like(alive)
        now.scatter_(1, rows, True)
        after = int(rows.max()) + 1  # the last prompt row is text, always kept; later rows too
        now[:, after:] = alive[:, after:]
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
        h = layer(h, attention_mask=mask, position_embeddings=cos_sin, position_ids=cur_pos)
    logits = model.lm_head(lm.norm(h))
    final = alive.nonzero()[:, 1].view(bsz, -1)
    return logits, final
