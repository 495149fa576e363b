"""The whole stack on one device in bf16, against PEFT (issue 19, item 3): outputs, mixed batches,
forward times and one training step.

Model: a Llama-shaped model with random weights built from its config on the device, in bf16 (no
download): TinyLlama's shape (1.1B: 22 layers, hidden 2048, 32 heads, 4 KV heads, MLP 5632, vocab
32000; `bench.serve.gpu_engine.build`), or with --quick a tiny one. Adapters: four PEFT LoRA
adapters made by `get_peft_model` and saved by `save_pretrained` into a temporary directory, with
random non-zero A and B (values representable in bf16, sized so that each adapter changes its
modules' outputs by about 30 %): r=8 on q/k/v/o, r=16 on gate/up/down with alpha < r, r=16
rsLoRA on all 7 projections, r=8 on q/v/down with a rank and alpha pattern. adapterhub loads them
from that directory with `Backbone.load`; PEFT with `PeftModel.from_pretrained` + `load_adapter`.

1. Logits, each adapter alone (PEFT: `set_adapter`) and one mixed batch of every adapter and the
   base (PEFT: `adapter_names=[...]`): max |ours - PEFT| / max |PEFT|, in bf16 and in fp32 (the
   same weights, exactly, cast up). The bf16 check: ours in bf16 is no further from the fp32
   logits than twice PEFT's own bf16 error (or 1e-2 of the logits' scale, whichever is larger),
   and the adapter's effect on the logits is at least 10x our difference from PEFT. fp32: within
   1e-4.
2. Gradients of one step (causal-LM loss on a random batch) for the rsLoRA adapter trained in its
   slots (`Backbone.training`) and by PEFT (`from_pretrained`, its LoRA tensors trainable, plain
   backward): per A and B tensor max |ours - PEFT| / max |PEFT|, the worst over all tensors; bf16
   by the same rule as the logits (2e-2 floor), fp32 within 1e-3.
3. Median times after warm-up (CUDA events on a GPU, perf_counter on a CPU): forwards of a prefill
   8 x 512 (one adapter; 4 adapters + base mixed) and of one decode token for 64 rows on a KV cache
   of 256 tokens (mixed), for the base model alone, ours and PEFT; and one training step
   (forward + backward) of 8 x 512, ours and PEFT.

Writes gpu_stack_<device>.md (and .json with every number) into --out and prints the markdown;
exits 1 if a check fails. About a minute on an H100 (estimated: most of it building the models).

    python -m bench.gpu_stack --out DIR                     (on a GPU: the 1.1B model)
    python -m bench.gpu_stack --device cpu --quick --out DIR   (the same code on a tiny model)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import adapterhub as ah
from adapterhub import ops
from bench.bench_backbone import run_step
from bench.serve.gpu_engine import TARGETS, build, device_slug

ADAPTERS = {
    "attn_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp_r16": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all_rs16": dict(r=16, lora_alpha=32, use_rslora=True, target_modules=TARGETS),
    "qv_pattern": dict(
        r=8,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 4},
        alpha_pattern={"down_proj": 20},
    ),
}
TRAINED = "all_rs16"
MIXED = ["attn_r8", None, "mlp_r16", "all_rs16", "qv_pattern", "attn_r8"]  # None: the base model
EFFECT = 0.3  # each adapter's delta / its module's base output, roughly
TOL = {"fp32_logits": 1e-4, "fp32_grads": 1e-3, "bf16_logits_floor": 1e-2, "bf16_grads_floor": 2e-2}
BF16_FACTOR = 2.0  # ours' bf16 error may be this many times PEFT's own
EFFECT_FACTOR = 10.0  # the adapters' effect on the logits / our difference from PEFT, at least
COLUMNS = ("base", "ours", "peft")  # the base model alone, adapterhub's Backbone, PEFT

SIZES = {  # compared batch, prefill, decode rows and context, training batch, timing repeats and warm-ups
    "full": dict(compare=(len(MIXED), 256), prefill=(8, 512), decode=(64, 256), train=(8, 512), reps=10, warmup=3),
    "quick": dict(compare=(len(MIXED), 12), prefill=(2, 32), decode=(6, 16), train=(2, 16), reps=3, warmup=1),
}


# ---- models and adapters ---------------------------------------------------------------------------
def write_adapters(model: torch.nn.Module, root: Path) -> dict[str, Path]:
    """ADAPTERS saved by PEFT for `model` (left untouched) with random A and B; name -> directory."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    names = list(ADAPTERS)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(**ADAPTERS[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, LoraConfig(**ADAPTERS[name]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (m for m in peft.modules() if isinstance(m, LoraLayer)):
            for name in names:
                if name not in layer.lora_A:
                    continue
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
                r, d_in = A.shape
                base_gain = 0.02 * d_in**0.5  # the base weights' std (build) times sqrt(in)
                b_std = EFFECT * base_gain / (layer.scaling[name] * r**0.5)
                A.copy_(_bf16_exact(torch.randn(A.shape, generator=g) / d_in**0.5))
                B.copy_(_bf16_exact(torch.randn(B.shape, generator=g) * b_std))
    peft.save_pretrained(root, selected_adapters=names)
    del peft
    dirs = {name: root / name for name in names}
    for name, d in dirs.items():
        assert (d / "adapter_config.json").exists(), f"PEFT did not save {name} to {d}"
    return dirs


def _bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Values that bf16 holds exactly, so that bf16 slots and PEFT's fp32 copies hold the same weights."""
    return t.to(torch.bfloat16).float()


class Stack:
    """The base model alone, ours (a Backbone with every adapter loaded) and PEFT's, in one dtype."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, dirs: dict[str, Path], base: bool = True):
        from peft import PeftModel

        self.base = copy.deepcopy(model).to(dtype).eval() if base else None
        self.ours = copy.deepcopy(model).to(dtype).eval()  # cast before the Backbone (README)
        self.bb = ah.Backbone(self.ours, max_adapters=8, max_rank=16)
        for name, d in dirs.items():
            self.bb.load(d, name=name)
        names = list(dirs)
        self.peft = PeftModel.from_pretrained(copy.deepcopy(model).to(dtype), dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.peft.load_adapter(dirs[name], adapter_name=name)
        self.peft.eval()

    def forward(self, which: str, ids: torch.Tensor, rows: str | list[str | None] | None, **kw):
        """One forward (no grad) of `which` (base, ours, peft) with `rows`: one adapter for every row,
        one per row (None: the base model), or None; `kw` go to the model."""
        with torch.no_grad():
            if which == "base":
                return self.base(ids, **kw)
            if which == "ours":
                with self.bb.use(rows):
                    return self.ours(ids, **kw)
            if isinstance(rows, list):
                return self.peft(ids, adapter_names=peft_names(rows), **kw)
            self.peft.set_adapter(rows)
            return self.peft(ids, **kw)

    def logits(self, which: str, ids: torch.Tensor, rows: str | list[str | None] | None) -> torch.Tensor:
        return self.forward(which, ids, rows).logits.float()


def peft_names(rows: list[str | None]) -> list[str]:
    """PEFT's adapter_names for per-row names (None: the base model)."""
    return [r or "__base__" for r in rows]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# ---- 1. logits -----------------------------------------------------------------------------------
def compare_logits(stacks: dict[str, Stack], ids: torch.Tensor, errors: dict) -> list[dict]:
    """Each adapter alone, then the mixed batch: ours vs PEFT in bf16 and fp32 (see the module docstring)."""
    cases = [(name, name) for name in ADAPTERS] + [("mixed: " + ", ".join(str(r) for r in MIXED), MIXED)]
    results = []
    for label, rows in cases:
        r = attempt(f"logits: {label}", lambda label=label, rows=rows: logits_case(stacks, ids, label, rows), errors)
        results += [r] if r else []
    return results


def logits_case(stacks: dict[str, Stack], ids: torch.Tensor, label: str, rows: str | list[str | None]) -> dict:
    got = {(dt, w): stacks[dt].logits(w, ids, rows) for dt in stacks for w in ("ours", "peft")}
    base = stacks["bf16"].logits("base", ids, None)
    r = {
        "case": label,
        "ours_vs_peft_bf16": rel(got["bf16", "ours"], got["bf16", "peft"]),
        "peft_bf16_vs_fp32": rel(got["bf16", "peft"], got["fp32", "peft"]),
        "ours_bf16_vs_fp32": rel(got["bf16", "ours"], got["fp32", "peft"]),
        "ours_vs_peft_fp32": rel(got["fp32", "ours"], got["fp32", "peft"]),
        "effect": rel(got["bf16", "peft"], base),  # how far the adapters move the logits
    }
    r["bf16_tol"] = max(BF16_FACTOR * r["peft_bf16_vs_fp32"], TOL["bf16_logits_floor"])
    r["ok_bf16"] = r["ours_bf16_vs_fp32"] <= r["bf16_tol"] and r["effect"] >= EFFECT_FACTOR * r["ours_vs_peft_bf16"]
    r["ok_fp32"] = r["ours_vs_peft_fp32"] <= TOL["fp32_logits"]
    print(f"logits {label}: {r}", flush=True)
    return r


# ---- 2. one training step ----------------------------------------------------------------------------
def peft_key(label: str) -> str:
    """Our "module path.A" -> PEFT's parameter name."""
    path, key = label.rsplit(".", 1)
    return f"base_model.model.{path}.lora_{key}.{TRAINED}.weight"


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids).loss


def ours_step(stack: Stack, ids: torch.Tensor) -> None:
    with stack.bb.use(TRAINED):
        loss = loss_of(stack.ours, ids)
    loss.backward()


def peft_trainable(stack: Stack) -> dict[str, torch.nn.Parameter]:
    """PEFT's TRAINED adapter made trainable (everything else frozen), as PEFT trains one adapter."""
    stack.peft.set_adapter(TRAINED)
    stack.peft.requires_grad_(False)
    params = {n: p for n, p in stack.peft.named_parameters() if f".{TRAINED}." in n and "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    return params


def gradients(stack: Stack, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ours, PEFT's) gradients of one step, by PEFT's parameter names."""
    with stack.bb.training(TRAINED) as trainable:
        ours_step(stack, ids)
        ours = {peft_key(k): p.grad.detach().clone() for k, p in trainable.named_parameters(TRAINED).items()}
    params = peft_trainable(stack)
    loss_of(stack.peft, ids).backward()
    theirs = {n: p.grad.detach().clone() for n, p in params.items()}
    stack.peft.zero_grad(set_to_none=True)
    stack.peft.requires_grad_(False)
    assert sorted(ours) == sorted(theirs), (sorted(set(ours) ^ set(theirs)))[:4]
    return {k: v.view_as(theirs[k]) for k, v in ours.items()}, theirs


def compare_grads(stacks: dict[str, Stack], ids: torch.Tensor) -> dict:
    grads = {dt: gradients(stacks[dt], ids) for dt in stacks}

    def worst(a: dict, b: dict) -> tuple[float, str, float]:
        each = {k: rel(a[k], b[k]) for k in b}
        name = max(each, key=each.get)
        return each[name], name, statistics.median(each.values())

    (ours_b, peft_b), (ours_f, peft_f) = grads["bf16"], grads["fp32"]
    zero = [k for k, g in peft_f.items() if g.abs().max() == 0]
    r = {"tensors": len(peft_f), "zero_gradients": zero}
    for key, (a, b) in {
        "ours_vs_peft_bf16": (ours_b, peft_b),
        "peft_bf16_vs_fp32": (peft_b, peft_f),
        "ours_bf16_vs_fp32": (ours_b, peft_f),
        "ours_vs_peft_fp32": (ours_f, peft_f),
    }.items():
        r[key], r[key + "_where"], r[key + "_median"] = worst(a, b)
    r["bf16_tol"] = max(BF16_FACTOR * r["peft_bf16_vs_fp32"], TOL["bf16_grads_floor"])
    r["ok_bf16"] = r["ours_bf16_vs_fp32"] <= r["bf16_tol"] and not zero
    r["ok_fp32"] = r["ours_vs_peft_fp32"] <= TOL["fp32_grads"] and not zero
    print(f"gradients: {r}", flush=True)
    return r


# ---- 3. times ------------------------------------------------------------------------------------------
def median_ms(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of fn() over `reps` calls after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timings(stack: Stack, size: dict, vocab: int, device: torch.device, errors: dict) -> list[dict]:
    """Forward times (ms) of the base model alone, ours and PEFT: prefill with one adapter, prefill
    mixed, one decode token mixed on a KV cache. A case that raises is recorded in `errors`."""
    g = torch.Generator().manual_seed(3)
    reps, warmup = size["reps"], size["warmup"]
    prefill = torch.randint(0, vocab, size["prefill"], generator=g).to(device)
    mixed = [MIXED[k % len(MIXED)] for k in range(prefill.size(0))]
    rows, context = size["decode"]
    decode_names = [MIXED[k % len(MIXED)] for k in range(rows)]
    prompt = torch.randint(0, vocab, (rows, context), generator=g).to(device)
    step = torch.randint(0, vocab, (rows, 1), generator=g).to(device)

    def prefill_ms(which, names):
        return median_ms(lambda: stack.forward(which, prefill, names).logits, device, reps, warmup)

    def decode_ms(which):
        """One token for every row on a cache of `context` tokens, cropped back after each step."""
        cache = stack.forward(which, prompt, decode_names, use_cache=True).past_key_values
        model = {"base": stack.base, "ours": stack.ours, "peft": stack.peft}[which]
        if which == "ours":

            def fn():
                with stack.bb.use(decode_names):
                    return run_step(model, step, cache)

        else:
            kw = {"adapter_names": peft_names(decode_names)} if which == "peft" else {}
            fn = lambda: run_step(model, step, cache, **kw)  # noqa: E731
        return median_ms(fn, device, 3 * reps, warmup)

    n, t = prefill.shape
    cases = {
        f"prefill {n}x{t}, 1 adapter ({TRAINED})": lambda: {w: prefill_ms(w, TRAINED) for w in COLUMNS},
        f"prefill {n}x{t}, mixed (4 adapters + base)": lambda: {w: prefill_ms(w, mixed) for w in COLUMNS},
        f"decode {rows} rows x 1 token, KV cache {context}, mixed": lambda: {w: decode_ms(w) for w in COLUMNS},
    }
    results = []
    for case, fn in cases.items():
        got = attempt(f"time: {case}", fn, errors)
        if got is not None:
            results.append({"case": case, **got})
            print(f"time {results[-1]}", flush=True)
    return results


def train_timing(stack: Stack, size: dict, vocab: int, device: torch.device) -> dict:
    """One training step (forward + backward, no optimizer) of TRAINED: ours in its slot, PEFT's."""
    ids = torch.randint(0, vocab, size["train"], generator=torch.Generator().manual_seed(4)).to(device)
    reps, warmup = size["reps"], size["warmup"]
    with stack.bb.training(TRAINED) as trainable:

        def ours():
            ours_step(stack, ids)
            for p in trainable.parameters():
                p.grad = None

        ours_ms = median_ms(ours, device, reps, warmup)
    params = peft_trainable(stack)

    def peft():
        loss_of(stack.peft, ids).backward()
        for p in params.values():
            p.grad = None

    try:
        peft_ms = median_ms(peft, device, reps, warmup)
    finally:
        stack.peft.requires_grad_(False)
    r = {"case": f"train step {ids.size(0)}x{ids.size(1)} (forward + backward), {TRAINED}", "ours": ours_ms}
    r["peft"] = peft_ms
    print(f"time {r}", flush=True)
    return r


def attempt(label: str, fn, errors: dict):
    """fn(), or None with the error kept under `label` (the rest of the run goes on and is reported)."""
    try:
        return fn()
    except Exception as error:  # reported; the run fails at the end
        traceback.print_exc()
        errors[label] = f"{type(error).__name__}: {error}"
        return None


# ---- the report ----------------------------------------------------------------------------------------
def environment(device: torch.device, model, shape: str) -> dict:
    import peft
    import transformers

    c = model.config
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    with_cuda = getattr(sys.modules.get("adapterhub._C"), "with_cuda", None)
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "ops_backend": ops.backend() + ("" if with_cuda is None else f" (with_cuda={with_cuda})"),
        "shape": shape,
        "model": (
            f"Llama {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
            f"{c.num_key_value_heads} KV heads, MLP {c.intermediate_size}, vocab {c.vocab_size}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters"
        ),
    }


def render(report: dict) -> str:
    env, size = report["env"], report["sizes"]
    yes = {True: "ok", False: "NOT OK"}
    lines = [
        f"## gpu_stack ({env['device']})",
        "",
        f"torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"Python {env['python']}; adapterhub ops: {env['ops_backend']}.",
        f"Model: {env['model']}, random weights, bf16 (fp32: the same weights cast up).",
        "Adapters (PEFT LoRA, random A and B): "
        + "; ".join(f"{n}: {json.dumps(c, separators=(',', ':'))}" for n, c in ADAPTERS.items())
        + ".",
        f"Wall time of this run: {report['wall_s']:.0f} s.",
        "",
        f"### 1. Logits vs PEFT ({size['compare'][0]} x {size['compare'][1]} random tokens)",
        "",
        "max |a - b| / max |b|. bf16 passes when ours-vs-fp32 <= max("
        f"{BF16_FACTOR:g} x PEFT's own bf16 error, {TOL['bf16_logits_floor']:g}) and the adapter's effect "
        f">= {EFFECT_FACTOR:g} x ours-vs-PEFT; fp32 when ours-vs-PEFT <= {TOL['fp32_logits']:g}.",
        "",
        "| case | ours vs PEFT bf16 | PEFT bf16 vs fp32 | ours bf16 vs fp32 | bf16 tol | adapter effect | bf16 "
        "| ours vs PEFT fp32 | fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["logits"]:
        lines.append(
            f"| {r['case']} | {r['ours_vs_peft_bf16']:.2e} | {r['peft_bf16_vs_fp32']:.2e} "
            f"| {r['ours_bf16_vs_fp32']:.2e} | {r['bf16_tol']:.2e} | {r['effect']:.2f} | {yes[r['ok_bf16']]} "
            f"| {r['ours_vs_peft_fp32']:.2e} | {yes[r['ok_fp32']]} |"
        )
    g = report["grads"] or {"tensors": "?", "zero_gradients": "?"}
    lines += [
        "",
        f"### 2. Gradients of one training step vs PEFT ({TRAINED}, {g['tensors']} A/B tensors, "
        f"{size['compare'][0]} x {size['compare'][1]} tokens, causal-LM loss)",
        "",
        "Per tensor max |a - b| / max |b|: the worst tensor, and the median over tensors. bf16 passes "
        f"when ours-vs-fp32 <= max({BF16_FACTOR:g} x PEFT's own, {TOL['bf16_grads_floor']:g}); fp32 when "
        f"ours-vs-PEFT <= {TOL['fp32_grads']:g}. Tensors with a zero gradient: {len(g['zero_gradients'])}.",
        "",
        "| comparison | worst | median | worst tensor |",
        "|---|---|---|---|",
    ]
    for key, label in [
        ("ours_vs_peft_bf16", "ours vs PEFT, bf16"),
        ("peft_bf16_vs_fp32", "PEFT bf16 vs fp32"),
        ("ours_bf16_vs_fp32", "ours bf16 vs fp32"),
        ("ours_vs_peft_fp32", "ours vs PEFT, fp32"),
    ]:
        if key in g:
            lines.append(f"| {label} | {g[key]:.2e} | {g[key + '_median']:.2e} | {g[key + '_where']} |")
    if report["grads"]:
        lines += ["", f"bf16: {yes[g['ok_bf16']]} (tol {g['bf16_tol']:.2e}); fp32: {yes[g['ok_fp32']]}.", ""]
    else:
        cut = report.get("reached") == "logits"
        lines += ["", "Not measured: the run was cut short." if cut else "Not measured: see the errors below.", ""]
    timer = "CUDA events" if env["device_type"] == "cuda" else "perf_counter"
    lines += [
        f"### 3. Times, bf16 (median ms after warm-up, {timer})",
        "",
        "| case | base | ours | PEFT | ours / base | PEFT / base | PEFT / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["times"]:
        base, ours, peft = r.get("base"), r["ours"], r["peft"]
        cells = ["-", "-", "-"] if base is None else [f"{base:.2f}", f"{ours / base:.2f}x", f"{peft / base:.2f}x"]
        lines.append(
            f"| {r['case']} | {cells[0]} | {ours:.2f} | {peft:.2f} | {cells[1]} | {cells[2]} | {peft / ours:.2f}x |"
        )
    lines += ["", "PEFT's mixed batch (`adapter_names`) rounds each delta to bf16 before adding it to the base output;"]
    lines += ["its single-adapter forward, like ours, adds in fp32 and rounds once."]
    if report["errors"]:
        lines += ["", "Errors (each stopped only its own part of the run):", ""]
        lines += [f"- {where}: `{what}`" for where, what in report["errors"].items()]
    if report.get("reached", "done") != "done":
        lines += ["", f"Run cut short after: {report['reached']} (the later parts are missing)."]
    lines += ["", f"All checks: {yes[report['ok']]}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or Path(__file__).parent / "results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model and small batches (a CPU smoke run)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("highest")  # fp32 means fp32, no TF32 (the fp32 checks are at 1e-4)
    shape = "tiny" if args.quick else "1.1b"
    size = SIZES["quick" if args.quick else "full"]
    torch.manual_seed(0)
    model = build(shape, str(device), torch.bfloat16)  # random weights, made on the device in bf16
    vocab = model.config.vocab_size
    env = environment(device, model, shape)
    print(f"gpu_stack: {env} ({time.perf_counter() - start:.1f} s)", flush=True)
    ids = torch.randint(0, vocab, size["compare"], generator=torch.Generator().manual_seed(1)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(model, Path(tmp))
        print(f"adapters written ({time.perf_counter() - start:.1f} s)", flush=True)
        stacks = {"bf16": Stack(model, torch.bfloat16, dirs), "fp32": Stack(model, torch.float32, dirs, base=False)}
    del model
    print(f"stacks built ({time.perf_counter() - start:.1f} s)", flush=True)
    errors: dict[str, str] = {}
    report = {"env": env, "sizes": size, "tolerances": TOL, "errors": errors, "logits": [], "grads": None}
    report["times"] = []
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"gpu_stack_{device_slug(env['device'] if device.type == 'cuda' else 'cpu')}"

    def save(reached: str) -> str:
        """Writes the report so far (a run cut short by its time limit still leaves what it measured, and
        says so: only the last call, reached == "done", may report the checks as passed)."""
        checks = [(r["ok_bf16"], r["ok_fp32"]) for r in report["logits"]]
        checks += [(report["grads"]["ok_bf16"], report["grads"]["ok_fp32"])] if report["grads"] else []
        report["reached"] = reached
        report["ok"] = reached == "done" and not errors and bool(checks) and all(a and b for a, b in checks)
        report["wall_s"] = time.perf_counter() - start
        text = render(report)
        (args.out / f"{name}.md").write_text(text)
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
        return text

    report["logits"] = compare_logits(stacks, ids, errors)
    save("logits")
    report["grads"] = attempt("gradients", lambda: compare_grads(stacks, ids), errors)
    save("gradients")
    del stacks["fp32"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report["times"] = timings(stacks["bf16"], size, vocab, device, errors)
    save("forward times")
    train = attempt("time: train step", lambda: train_timing(stacks["bf16"], size, vocab, device), errors)
    report["times"] += [train] if train else []
    text = save("done")
    print(text, flush=True)
    print(f"written: {args.out / name}.md, .json", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
