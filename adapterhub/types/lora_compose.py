"""LoRA compositions with the semantics of PEFT's `LoraModel.add_weighted_adapter`.

    cat      runs on the fly (several slots per row): sum_k w_k scale_k B_k A_k x, times the scale of
             the adapter PEFT would make (r = alpha = the sum of the ranks: 1, or sqrt(r) with rsLoRA)
    linear, ties, dare_linear, dare_ties, magnitude_prune
             merge A and B separately; each adapter's weight w_k * scale_k is split as sqrt(|.|) onto
             A (with the sign) and B; all ranks must be equal
    svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
             merge the dense deltas scale_k B_k A_k, then B = U S, A = V^T truncated to svd_rank
             (default: the largest rank)

The made adapter, like PEFT's, has r = lora_alpha = its rank and the first adapter's other settings.
"""

from __future__ import annotations

import math

import torch

from ..errors import AdapterError
from ..formats import Adapter
from ..formats.peft_lora import lora_scale
from ..plugins.merging import TASK_ARITHMETIC, merge

SVD = tuple(f"{m}_svd" if m != "linear" else "svd" for m in TASK_ARITHMETIC)
METHODS = ("cat", *TASK_ARITHMETIC, *SVD)


def config_rank(config: dict) -> int:
    """The rank PEFT sizes a merged adapter by: r, or the largest rank_pattern entry if larger."""
    return max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])


def cat_scale(configs: list[dict]) -> float:
    """The scale of the adapter PEFT's "cat" makes: r = lora_alpha = the sum of the ranks."""
    rank = sum(config_rank(c) for c in configs)
    return lora_scale(rank, rank, bool(configs[0].get("use_rslora")))


def compose_lora(adapters: list[Adapter], weights: list[float], method: str, options: dict) -> Adapter:
    """One LoRA adapter combining `adapters` by `method` (not "cat", which the slots run on the fly)."""
    for adapter in adapters:
        if adapter.config.get("use_dora"):
            raise AdapterError(f"{adapter.source}: DoRA adapters cannot be composed (PEFT cannot merge them either)")
    ranks = [config_rank(a.config) for a in adapters]
    if method.endswith("svd"):
        rank = options.get("svd_rank") or max(ranks)
    elif len(set(ranks)) > 1:
        raise AdapterError(
            f'method "{method}" needs adapters of one rank (PEFT\'s rule), got ranks {ranks}; use "cat" or '
            'an "_svd" method, which combine any ranks'
        )
    else:
        rank = ranks[0]
    scale = lora_scale(rank, rank, bool(adapters[0].config.get("use_rslora")))
    generator = torch.Generator().manual_seed(int(options.get("seed", 0)))
    paths = list(dict.fromkeys(p for a in adapters for p in a.modules))
    modules = {}
    for path in paths:
        present = [(a.modules[path], w) for a, w in zip(adapters, weights) if path in a.modules]
        merged = _svd(present, method, rank, options, generator) if method.endswith("svd") else None
        A, B = merged or _split(present, method, options, generator)
        modules[path] = {"A": A.contiguous(), "B": B.contiguous(), "scale": torch.tensor(scale, dtype=torch.float64)}
    first = adapters[0].config
    config = {
        **first,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in paths}),
    }
    return Adapter(type=adapters[0].type, config=config, modules=modules, source=f"composition ({method})")


def _split(present: list, method: str, options: dict, generator: torch.Generator):
    """Merges A and B separately, sqrt(|w scale|) on each (the sign on A)."""
    scaled = [w * float(t["scale"]) for t, w in present]
    weights_A = torch.tensor([math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in scaled])
    weights_B = torch.tensor([math.sqrt(abs(s)) for s in scaled])
    dtype = present[0][0]["A"].dtype
    kw = dict(density=options.get("density"), majority_sign_method=options.get("majority_sign_method", "total"))
    A = merge([t["A"] for t, _ in present], weights_A, method, generator=generator, **kw)
    B = merge([t["B"] for t, _ in present], weights_B, method, generator=generator, **kw)
    return A.to(dtype), B.to(dtype)


def _svd(present: list, method: str, rank: int, options: dict, generator: torch.Generator):
    """Merges the dense deltas (out, in), then factors them: (A (rank, in), B (out, rank))."""
    dtype = present[0][0]["A"].dtype
    deltas = [(t["B"] @ t["A"]) * float(t["scale"]) for t, _ in present]
    weights = torch.tensor([w for _, w in present])  # fp32, as PEFT's
    kind = "linear" if method == "svd" else method.removesuffix("_svd")
    delta = merge(
        deltas,
        weights,
        kind,
        density=options.get("density"),
        majority_sign_method=options.get("majority_sign_method", "total"),
        generator=generator,
    )
    U, S, Vh = torch.linalg.svd(delta, full_matrices=options.get("svd_full_matrices", True))
    U = U[:, :rank] @ torch.diag(S[:rank])  # (out, rank)
    Vh = Vh[:rank, :]  # (rank, in)
    clamp = options.get("svd_clamp")
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    return Vh.to(dtype), U.to(dtype)
