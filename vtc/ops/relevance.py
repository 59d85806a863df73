"""Text-guided relevance of visual tokens (SparseVLM, Zhang et al., ICML 2025)."""

from __future__ import annotations

import torch


def select_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Which text tokens rate the visual ones: SparseVLM's raters.

    ``visual`` ``[Nv, D]`` and ``text`` ``[T, D]`` are the LLM's input embeddings of an image's tokens
    and of the text after it. Each visual token spreads a softmax over the text tokens
    (``visual @ text^T``); averaged over the visual tokens, the text tokens above the mean are the
    raters. Returns a boolean mask ``[T]``.

    Example:
        >>> visual = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
        >>> select_raters(visual, torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))
        tensor([ True, False, False])
    """
    share = (visual @ text.transpose(0, 1)).softmax(dim=1).mean(dim=0)
    return share > share.mean()


def rater_relevance(attention: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Each visual token's relevance: the raters' attention to it, averaged over the raters.

    ``attention`` ``[r, N]`` holds the raters' attention rows (averaged over heads) over the whole
    sequence, ``visual`` the visual tokens' indices; returns ``[len(visual)]``.

    Example:
        >>> rater_relevance(torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]]), torch.tensor([1, 2]))
        tensor([0.4000, 0.4000])
    """
    return attention[:, visual].mean(dim=0)
