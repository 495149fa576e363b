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
SVD_BUDGET = 256 << 20  # bytes of dense deltas and factors an _svd merge holds at once


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
    if len(adapters) == 1:  # PEFT's rule: one adapter is only ever scaled ("linear")
        method = "linear"
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
    groups: dict[tuple, list[str]] = {}  # (inputs present, A's and B's shapes) -> paths merged in one go
    for path in paths:
        present = tuple(k for k, a in enumerate(adapters) if path in a.modules)
        shapes = tuple(
            (tuple(adapters[k].modules[path]["A"].shape), tuple(adapters[k].modules[path]["B"].shape)) for k in present
        )
        groups.setdefault((present, shapes), []).append(path)
    modules = {}
    for (present, shapes), paths_of_shape in groups.items():
        if not method.endswith("svd") and len(set(shapes)) > 1:
            raise AdapterError(
                f'method "{method}" merges A and B of one shape, but the adapters adapt {paths_of_shape[0]!r} '
                f'with ranks {[a for (a, _), _ in shapes]} (rank_pattern); use "cat" or an "_svd" method'
            )
        for group in _chunks(paths_of_shape, shapes, method):
            parts = [[adapters[k].modules[path] for path in group] for k in present]  # [K][M]
            scaled = [[weights[k] * float(t["scale"]) for t in row] for k, row in zip(present, parts)]
            merge_group = _svd if method.endswith("svd") else _split
            A, B = merge_group(parts, scaled, [weights[k] for k in present], method, rank, options, generator)
            for m, path in enumerate(group):
                modules[path] = {
                    "A": A[m].contiguous(),
                    "B": B[m].contiguous(),
                    "scale": torch.tensor(scale, dtype=torch.float64),
                }
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


def _chunks(paths: list[str], shapes: tuple, method: str) -> list[list[str]]:
    """`paths` in groups small enough to merge at once: the _svd methods hold K dense (out, in) deltas
    per module (and SVD factors), so they go in chunks of at most SVD_BUDGET bytes."""
    if not method.endswith("svd"):
        return [paths]
    (_, in_features), (out_features, _) = shapes[0]
    per_module = 4 * (len(shapes) * out_features * in_features + out_features**2 + in_features**2)  # deltas, U, Vh
    size = max(1, SVD_BUDGET // per_module)
    return [paths[i : i + size] for i in range(0, len(paths), size)]


def _stack(parts: list[list[dict]], key: str) -> torch.Tensor:
    """parts [K][M] of module tensors -> (K, M, ...) of `key`, in one copy."""
    flat = torch.stack([t[key] for row in parts for t in row])  # (K*M, ...)
    return flat.view(len(parts), len(parts[0]), *flat.shape[1:])


def _options(options: dict) -> dict:
    return dict(density=options.get("density"), majority_sign_method=options.get("majority_sign_method", "total"))


def _split(parts, scaled, weights, method, rank, options, generator):
    """Merges A and B separately, sqrt(|w scale|) on each (the sign on A): (A (M, r, in), B (M, out, r))."""

    weights_A = torch.tensor([[math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in row] for row in scaled])  # (K, M)
    weights_B = torch.tensor([[math.sqrt(abs(s)) for s in row] for row in scaled])
    dtype = parts[0][0]["A"].dtype
    A = merge(_stack(parts, "A"), weights_A, method, generator=generator, **_options(options))
    B = merge(_stack(parts, "B"), weights_B, method, generator=generator, **_options(options))
    return A.to(dtype), B.to(dtype)


def _svd(parts, scaled, weights, method, rank, options, generator):
    """Merges the dense deltas (M, out, in), then factors each: (A (M, rank, in), B (M, out, rank))."""
    dtype = parts[0][0]["A"].dtype
    scales = torch.tensor([[float(t["scale"]) for t in row] for row in parts], dtype=dtype)  # (K, M)
    deltas = torch.stack([_stack([row], "B")[0] @ _stack([row], "A")[0] for row in parts])  # (K, M, out, in)
    deltas = deltas * scales[..., None, None]  # each input's rank may differ: one product per input
    per_input = torch.tensor(weights)[:, None].expand(len(parts), len(parts[0]))  # (K, M), fp32 as PEFT's
    kind = "linear" if method == "svd" else method.removesuffix("_svd")
    delta = merge(deltas, per_input, kind, generator=generator, **_options(options))  # (M, out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=options.get("svd_full_matrices", True))
    U = U[..., :rank] @ torch.diag_embed(S[..., :rank])  # (M, out, rank)
    Vh = Vh[..., :rank, :]  # (M, rank, in)
    clamp = options.get("svd_clamp")
    if clamp is not None:
        for m in range(U.size(0)):
            high = torch.quantile(torch.cat([U[m].flatten(), Vh[m].flatten()]), clamp)
            U[m], Vh[m] = U[m].clamp(-high, high), Vh[m].clamp(-high, high)
    return Vh.to(dtype), U.to(dtype)
