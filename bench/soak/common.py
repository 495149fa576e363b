"""What the soak and overload benchmarks share: the tiny served llama of the tests written to disk,
many small distinct PEFT LoRA adapters for it, the offline reference answers (`adapterhub.Backbone`
in this process, greedy), `adapterhub serve` as a real subprocess, its resident memory and metrics,
and what else the machine was doing.

The tiny model and its adapters come from tests/serving.py and tests/tiny_models.py (a 2-layer,
hidden-32 llama with a character-level tokenizer), so that this benchmark serves what the tests
serve. One PEFT adapter per rank is written by PEFT itself (`get_peft_model(...).save_pretrained`);
the others copy its config and get their own random tensors written with safetensors directly
(N(0, 0.3^2), the tests' scale: every adapter changes the greedy answers).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:  # tests/serving.py imports `tiny_models` as a top-level module
    sys.path.insert(0, str(TESTS))

from serving import served_llama  # noqa: E402
from tiny_models import LLAMA_TARGETS, save_peft_adapter, tiny_llama, tiny_tokenizer  # noqa: E402

from bench.serve.servers import Server  # noqa: E402

BASE_NAME = "tiny"
SCALE = 0.3  # tests/tiny_models.save_peft's scale
RANKS = (4, 8)  # adapters alternate between these LoRA ranks (per-slot ranks in one batch)
PRINTABLE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-"


def write_base(root: Path, context: int | None = None) -> Path:
    """The tests' served tiny llama and its tokenizer under root/base; `context` widens its
    max_position_embeddings (rotary positions have no limit) for longer generations."""
    model = served_llama()
    if context:
        model.config.max_position_embeddings = context
    directory = root / ("base" if context is None else f"base-{context}")
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def make_adapters(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` distinct LoRA adapters (all 7 projections, ranks alternating over RANKS, lora_alpha 2r)
    under `directory` as d0000, d0001, ...: PEFT writes one template per rank, the rest are its
    config with random tensors of their own."""
    templates = {}
    for r in RANKS:
        template = save_peft_adapter(
            tiny_llama, directory / f"template-r{r}", seed=seed, r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS
        )
        shapes = {k: v.shape for k, v in load_file(template / "adapter_model.safetensors").items()}
        templates[r] = ((template / "adapter_config.json").read_text(), shapes)
    dirs = []
    for i in range(count):
        config, shapes = templates[RANKS[i % len(RANKS)]]
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        d = directory / f"d{i:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text(config)
        tensors = {k: torch.randn(s, generator=g) * SCALE for k, s in sorted(shapes.items())}
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
        dirs.append(d)
    return dirs


def prompts(count: int, length: int, seed: int = 0) -> list[str]:
    """`count` random prompts of `length` characters (= tokens: the tokenizer is one per character)."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(PRINTABLE), (count, length), generator=g).tolist()
    return ["".join(PRINTABLE[k] for k in row) for row in picks]


class Reference:
    """Greedy answers computed offline with `adapterhub.Backbone` on the same tiny model, recomputing
    the whole sequence each step (no KV cache): the plainest reference, as tests/serving.Offline.
    Each batch holds every prompt (all of one length) of up to `chunk` adapters, each row routed to
    its own adapter. Also keeps, per answer, the smallest gap between the best and second-best logit
    along its greedy path: where it is tiny, another exact computation (batched, paged) may
    legitimately pick the other token (a near tie, not a wrong answer)."""

    def __init__(self, prompts: list[str], max_tokens: int, max_rank: int = max(RANKS), chunk: int = 32):
        from adapterhub import Backbone

        self.prompts, self.max_tokens, self.chunk = prompts, max_tokens, chunk
        self.tokenizer = tiny_tokenizer()
        self.ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        if len({len(i) for i in self.ids}) != 1:
            raise ValueError("the reference batches its prompts: give them all the same length")
        self.backbone = Backbone(served_llama(), max_adapters=chunk, max_rank=max_rank)
        self.texts: dict[str | None, list[str]] = {}  # source (None: the base) -> text per prompt
        self.margins: dict[str | None, list[float]] = {}  # source -> smallest top-2 logit gap per prompt

    def compute(self, sources: list[str | None]) -> None:
        """The answers of every prompt for each of `sources` (adapter directories; None: the base)."""
        todo = list(dict.fromkeys(s for s in sources if s not in self.texts))
        for start in range(0, len(todo), self.chunk):
            self._batch(todo[start : start + self.chunk])

    def _batch(self, sources: list[str | None]) -> None:
        names = [None if s is None else self.backbone.load(s, name=f"ref{k}") for k, s in enumerate(sources)]
        try:
            batch = torch.tensor(self.ids).repeat(len(sources), 1)
            gaps = torch.full((batch.size(0),), math.inf)
            rows = [name for name in names for _ in self.ids]
            with self.backbone.use(rows), torch.no_grad():
                for _ in range(self.max_tokens):
                    logits = self.backbone.model(batch).logits[:, -1].float()
                    top = logits.topk(2, dim=-1).values
                    gaps = torch.minimum(gaps, top[:, 0] - top[:, 1])
                    batch = torch.cat([batch, logits.argmax(-1, keepdim=True)], dim=1)
        finally:
            for name in names:
                if name is not None:
                    self.backbone.unload(name)
        new, n = batch[:, len(self.ids[0]) :].tolist(), len(self.ids)
        for k, source in enumerate(sources):
            self.texts[source] = [self.tokenizer.decode(t, skip_special_tokens=True) for t in new[k * n : (k + 1) * n]]
            self.margins[source] = gaps[k * n : (k + 1) * n].tolist()


def serve_command(base: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "adapterhub.cli", "serve", "--base", str(base), "--served-model-name", BASE_NAME,
            "--port", "0", *args]  # fmt: skip


def start_server(name: str, command: list[str], threads: int = 1) -> Server:
    """The server as bench/serve/servers.py starts one (its log in a temp file), with `threads` torch threads."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        return Server(name, command).start(timeout=300)
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous


def rss_mib(pid: int) -> float:
    """VmRSS of process `pid` in MiB (from /proc/<pid>/status)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) / 1024


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 if absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def scrape(url: str, key: str) -> str:
    """/metrics text, with the admin key."""
    return httpx.get(url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text


@dataclass
class CpuWatch:
    """CPU the rest of the machine used (in cores) between start() and stop(): all busy CPU time minus
    this process's and the watched ones'; with the load average and the busiest other processes at
    the end, for the results' 'what else ran' note."""

    pids: list[int]

    def start(self) -> CpuWatch:
        self._start = self._sample()
        return self

    def stop(self) -> dict:
        end = self._sample()
        (t0, busy0, ours0), (t1, busy1, ours1) = self._start, end
        other = max(((busy1 - busy0) - (ours1 - ours0)) / (t1 - t0), 0.0)
        ours = (ours1 - ours0) / (t1 - t0)
        return {
            "other_cores": round(other, 2),
            "ours_cores": round(ours, 2),
            "cpus": os.cpu_count(),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "busiest_others": busiest(exclude={os.getpid(), *self.pids}),
        }

    def _sample(self) -> tuple[float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        cpu = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(cpu[:8]) - cpu[3] - cpu[4]) / tick
        ours = 0.0
        for pid in (os.getpid(), *self.pids):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ours += (float(fields[11]) + float(fields[12])) / tick
            except OSError:
                pass
        return time.perf_counter(), busy, ours


def busiest(exclude: set[int], count: int = 5) -> list[str]:
    """The `count` processes with the most CPU now (ps's %CPU over their life), but `exclude`d ones."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etimes,args", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines():
        pid, pcpu, _elapsed, args = line.split(None, 3)
        if int(pid) in exclude or args.startswith("ps "):
            continue
        rows.append(f"{pcpu}% {args[:110]}")
        if len(rows) == count:
            break
    return rows


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = math.floor(k), math.ceil(k)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def keys_file(path: Path, tenants: list[str], models: list[str]) -> Path:
    """A keys file: sk-admin may do everything, each tenant key may name `models`."""
    path.write_text(json.dumps({"keys": {"sk-admin": "*", **{key: models for key in tenants}}}))
    return path


def revision() -> str:
    """The commit the server runs, and whether adapterhub/ had uncommitted changes when it started."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "adapterhub"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" with uncommitted changes under adapterhub/" if dirty else "")


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, Python {sys.version.split()[0]}"
