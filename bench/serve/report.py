"""The serving benchmark's results: raw numbers (JSON), the table (markdown) and the plot (PNG).

python -m bench.serve.report     (redraws the table and the plot from bench/results/serve_smollm2.json)
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
JSON, PNG, MD = RESULTS / "serve_smollm2.json", RESULTS / "serve_smollm2.png", RESULTS / "serve_smollm2.md"
TARGET_ADAPTERS, TARGET_PEFT = 0.8, 5.0  # 64 adapters >= 0.8x one adapter; >= 5x PEFT at 64 adapters
QUIET = 0.15  # cores other processes may use during a run before it counts as disturbed


def case(run: dict) -> str:
    who = "ours" if run["server"] == "ours" else "PEFT"
    spread = "" if run["adapters"] == 1 else (", uniform" if run["popularity"] == "uniform" else ", skewed")
    return f"{who}, {run['adapters']} adapter{'s' if run['adapters'] > 1 else ''}{spread}"


def _find(results: dict, server: str, adapters: int, popularity: str = "uniform") -> dict | None:
    for run in results["runs"]:
        if (run["server"], run["adapters"], run["popularity"]) == (server, adapters, popularity):
            return run
    return None


def _ratio(a: dict | None, b: dict | None, key: str = "tokens_per_s") -> float | None:
    return a[key] / b[key] if a and b and b.get(key) else None


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(results: dict) -> str:
    if not results.get("runs"):
        return "(no runs)"
    rate, grace = results["rate"], results["grace_s"]
    lines = [
        f"Offered load: {rate:g} requests/s = {rate * results['max_tokens']:.0f} completion tokens/s, Poisson "
        f"arrivals for {results['duration_s']:g} s; then ours runs until every request finished (at most "
        f"{grace['ours']:g} s), PEFT for {grace['peft']:g} s more. Steady tokens/s: generated from "
        f"{results['skip_s']:g} s to the end of the arrivals. Prompts of {results['prompt_tokens'][0]}-"
        f"{results['prompt_tokens'][1]} tokens, {results['max_tokens']} completion tokens each (greedy, "
        f"ignore_eos), streamed. Skewed: Zipf popularity, s = {results['zipf_s']:g}. LoRA r={results['rank']} "
        "on all 7 projections, fp32.",
        "",
        "| configuration | tokens/s | steady tokens/s | completed / sent | latency p50 s | latency p99 s "
        "| TTFT p50 s | TTFT p99 s | / ours, 1 adapter | ours / PEFT |",
        "|" + "---|" * 10,
    ]
    one = _find(results, "ours", 1)
    for run in results["runs"]:
        ge = ">= " if run["lower_bound"] else ""
        peft = _find(results, "peft", run["adapters"], run["popularity"]) if run["server"] == "ours" else None
        lines.append(
            f"| {case(run)} | {run['tokens_per_s']:.1f} | {run['steady_tokens_per_s']:.1f} "
            f"| {run['completed']} / {run['sent']} | {ge}{run['latency_p50_s']:.2f} "
            f"| {ge}{run['latency_p99_s']:.2f} | {ge}{run['ttft_p50_s']:.2f} | {ge}{run['ttft_p99_s']:.2f} "
            f"| {_x(_ratio(run, one))} | {_x(_ratio(run, peft))} |"
        )
    targets = []
    peers = [
        (f">= {TARGET_ADAPTERS}x the tokens/s of 1 adapter", TARGET_ADAPTERS, lambda popularity: one),
        (
            f">= {TARGET_PEFT:g}x the PEFT baseline's tokens/s",
            TARGET_PEFT,
            lambda popularity: _find(results, "peft", 64, popularity),
        ),
    ]
    for text, goal, peer in peers:
        for popularity, label in (("uniform", "uniform"), ("zipf", "skewed")):
            ours = _find(results, "ours", 64, popularity)
            run, steady = _ratio(ours, peer(popularity)), _ratio(ours, peer(popularity), "steady_tokens_per_s")
            if run is None:
                continue
            verdict = (
                "met"
                if min(run, steady) >= goal
                else "not met"
                if max(run, steady) < goal
                else "met on one measure of the two"
            )
            targets.append(f"| 64 adapters ({label}) {text} | {run:.2f}x | {steady:.2f}x | {verdict} |")
    if targets:
        lines += ["", "| target | tokens/s | steady tokens/s | |", "|---|---|---|---|", *targets]
    others = [run.get("other_cpu_cores") for run in results["runs"] if run.get("other_cpu_cores") is not None]
    if others:
        busy = [case(run) for run in results["runs"] if (run.get("other_cpu_cores") or 0) > QUIET]
        lines += [
            "",
            f"Other processes used {min(others):.2f}-{max(others):.2f} cores during the runs"
            + (
                f"; disturbed (> {QUIET} cores): {'; '.join(busy)}. Rerun on a quiet machine."
                if busy
                else " (a quiet machine)."
            ),
        ]
    if any(run["lower_bound"] for run in results["runs"]):
        lines += [
            "",
            '">=": requests still unfinished when the run ended were cancelled; their tokens are not '
            "counted and they enter the latency percentiles at their age then (a lower bound).",
        ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = [case(r).replace(", ", "\n") for r in runs]
    colors = ["tab:blue" if r["server"] == "ours" else "tab:orange" for r in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    x, width = range(len(runs)), 0.4

    def pairs(ax, first: str, second: str) -> None:
        """Two bars per run: `first` light, `second` dark; hatched where the run left requests unfinished."""
        for offset, key, alpha in ((-width / 2, first, 0.5), (width / 2, second, 1.0)):
            bars = ax.bar([i + offset for i in x], [r[key] for r in runs], width, color=colors, alpha=alpha)
            for bar, run in zip(bars, runs):
                bar.set_hatch("//" if run["lower_bound"] and key.startswith("latency") else "")

    pairs(left, "tokens_per_s", "steady_tokens_per_s")
    left.axhline(
        results["rate"] * results["max_tokens"],
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"offered: {results['rate'] * results['max_tokens']:.0f} tokens/s",
    )
    left.set_ylabel("completion tokens/s")
    left.set_title("throughput: over the run (light), steady (dark)")
    left.legend(loc="upper right")
    pairs(right, "latency_p50_s", "latency_p99_s")
    right.set_ylabel("end-to-end latency, s")
    right.set_title("latency p50 (light), p99 (dark); hatched: lower bound")
    for ax in (left, right):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
    figure.suptitle(
        f"SmolLM2-135M, 64 LoRA adapters r=16, {results['rate']:g} requests/s offered, "
        f"{results['max_tokens']} tokens each. Blue: adapterhub serve; orange: PEFT, one request at a time",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    JSON.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, PNG)


if __name__ == "__main__":
    results = json.loads(JSON.read_text())
    plot(results, PNG)
    MD.write_text(f"## serve_smollm2\n\nMachine: {results['machine']}\n\n{table(results)}\n")
    print(MD.read_text())
