"""Tie-aware top-k selection and merging (descending score, ties to the lower index), the
kernel's input checks, and the helpers every pass shares."""
from __future__ import annotations

import math
import os

import numpy as np

from ..errors import BadValue

#: threads scanning a tile or gathering candidates (numpy releases the GIL in those loops)
_POOL_THREADS = max(1, min(8, os.cpu_count() or 1))

# --------------------------------------------------------------------------------------- inputs
def _as_rows(features: np.ndarray, what: str = "features") -> np.ndarray:
    """The kernel's only check: a 2-D float array, as C-contiguous float32 (validated upstream,
    by ``paintsim.embeddings``)."""
    arr = np.asarray(features)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be a 2-D float array [N, D], got {arr.dtype} {arr.shape}")
    if arr.dtype == np.float32 and arr.flags.c_contiguous:
        return arr
    return np.ascontiguousarray(arr, dtype=np.float32)


def validate_k(k: int, n: int, exclude_self: bool = True) -> int:
    """``1 <= k < N`` when a row's own index is excluded (``k <= N`` otherwise)."""
    limit = n - 1 if exclude_self else n
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= limit:
        what = "other paintings" if exclude_self else "paintings"
        raise BadValue("k", k, f"must be between 1 and {limit} (there are {limit} {what})")
    return int(k)


def check_block_size(block_size: int | None) -> None:
    if block_size is not None and (isinstance(block_size, bool) or block_size < 1):
        raise BadValue("block_size", block_size, "must be at least 1")


# ------------------------------------------------------------------------------------ selection
def select_top_k(scores, k: int, col_offset: int = 0, self_rows=None):
    """Top ``k`` of each row of a score block, descending, ties to the lower column index.

    ``scores`` is a float torch tensor ``[B, C]`` (any device, modified in place when
    ``self_rows`` is given); ``self_rows`` (int tensor ``[B]``) are global column indices to
    exclude (set to -inf). Returns ``(values [B, k'], indices int64 [B, k'])`` with
    ``k' = min(k, C)``, indices global (``col_offset`` added).
    """
    import torch

    b, c = scores.shape
    if self_rows is not None:
        local = self_rows - col_offset
        inside = (local >= 0) & (local < c)
        if bool(inside.any()):
            rows = torch.nonzero(inside).flatten()
            scores[rows, local[rows]] = -math.inf
    kk = min(k, c)
    if kk == 0:
        return (scores.new_empty((b, 0)), torch.empty((b, 0), dtype=torch.int64, device=scores.device))
    if c > kk:
        # one extra value tells whether the k-th place is tied with something left out
        vals, pos = torch.topk(scores, kk + 1, dim=1, largest=True, sorted=True)
        tied = vals[:, kk - 1] == vals[:, kk]
        vals, pos = vals[:, :kk].contiguous(), pos[:, :kk].contiguous()
        if bool(tied.any()):
            rows = torch.nonzero(tied).flatten()
            sub = scores[rows]
            kth = vals[rows, kk - 1 : kk]
            above = sub > kth
            eq = sub == kth
            need = kk - above.sum(1, keepdim=True)
            # the lowest-index members of the tie fill the remaining places
            keep = above | (eq & (torch.cumsum(eq, 1, dtype=torch.int32) <= need))
            cols = torch.nonzero(keep)[:, 1].reshape(len(rows), kk)
            pos[rows] = cols
            vals[rows] = torch.gather(sub, 1, cols)
    else:
        vals, pos = scores, torch.arange(c, device=scores.device).expand(b, c)
    vals, pos = _sort_desc_lower_index(vals, pos)
    return vals, pos + col_offset


def _sort_desc_lower_index(vals, idx):
    """Sort each row by descending value, equal values by ascending index."""
    import torch

    if vals.device.type == "cpu" and vals.dtype == torch.float32 and vals.numel():
        # numpy's lexsort: torch's CPU argsort is ~20x slower on these shapes
        v, i = vals.numpy(), idx.numpy()
        order = np.lexsort((i, -v), axis=1)
        return (torch.from_numpy(np.take_along_axis(v, order, 1)),
                torch.from_numpy(np.take_along_axis(i, order, 1)))
    order = torch.argsort(idx, dim=1, stable=True)
    vals, idx = torch.gather(vals, 1, order), torch.gather(idx, 1, order)
    order = torch.argsort(vals, dim=1, descending=True, stable=True)
    return torch.gather(vals, 1, order), torch.gather(idx, 1, order)


def merge_top_k(vals_a, idx_a, vals_b, idx_b, k: int):
    """Merge two per-row top lists into one of ``k`` (descending, ties to the lower index)."""
    import torch

    vals, idx = _sort_desc_lower_index(torch.cat([vals_a, vals_b], 1), torch.cat([idx_a, idx_b], 1))
    return vals[:, :k].contiguous(), idx[:, :k].contiguous()


def _progress(total: int, enabled: bool, desc: str, unit: str = "row"):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit=unit, unit_scale=True,
                dynamic_ncols=True, mininterval=0.5)
