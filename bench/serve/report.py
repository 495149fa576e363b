"""The serving benchmark's results: raw numbers (JSON), the table (markdown) and the plot (PNG).

    python -m bench.serve.report     (redraws the table and the plot from bench/results/serve_smollm2.json)
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
JSON, PNG, MD = RESULTS / "serve_smollm2.json", RESULTS / "serve_smollm2.png", RESULTS / "serve_smollm2.md"
TARGET_ADAPTERS, TARGET_PEFT = 0.8, 5.0  # 64 adapters >= 0.8x one adapter; >= 5x PEFT at 64 adapters


def case(run: dict) -> str:
    who = "ours" if run["server"] == "ours" else "PEFT"
    spread = "" if run["adapters"] == 1 else (", uniform" if run["popularity"] == "uniform" else ", skewed")
    return f"{who}, {run['adapters']} adapter{'s' if run['adapters'] > 1 else ''}{spread}"


def _find(results: dict, server: str, adapters: int, popularity: str = "uniform") -> dict | None:
    for run in results["runs"]:
        if (run["server"], run["adapters"], run["popularity"]) == (server, adapters, popularity):
            return run
    return None


def _ratio(a: dict | None, b: dict | None) -> float | None:
    return a["tokens_per_s"] / b["tokens_per_s"] if a and b and b["tokens_per_s"] else None


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(results: dict) -> str:
    if not results.get("runs"):
        return "(no runs)"
    rate = results["rate"]
    calibration = results.get("calibration")
    why = (f"{results['rate_from']}: {calibration['capacity_tokens_per_s']:.0f} tokens/s measured under an "
           f"overload of {calibration['rate']:g} requests/s" if calibration else results["rate_from"])
    lines = [f"Offered load: {rate:g} requests/s = {rate * results['max_tokens']:.0f} completion tokens/s ({why}). "
             f"Poisson arrivals for {results['duration_s']:g} s, then {results['grace_s']:g} s of grace; prompts of "
             f"{results['prompt_tokens'][0]}-{results['prompt_tokens'][1]} tokens, {results['max_tokens']} completion "
             f"tokens each (greedy, ignore_eos), streamed. Skewed: Zipf popularity, s = {results['zipf_s']:g}. "
             f"LoRA r={results['rank']} on all 7 projections, fp32.", "",
             "| configuration | tokens/s | completed / sent | latency p50 s | latency p99 s | TTFT p50 s "
             "| TTFT p99 s | / ours, 1 adapter | ours / PEFT |", "|---|---|---|---|---|---|---|---|---|"]
    one = _find(results, "ours", 1)
    for run in results["runs"]:
        ge = ">= " if run["lower_bound"] else ""
        peft = _find(results, "peft", run["adapters"], run["popularity"]) if run["server"] == "ours" else None
        lines.append(f"| {case(run)} | {run['tokens_per_s']:.1f} | {run['completed']} / {run['sent']} "
                     f"| {ge}{run['latency_p50_s']:.2f} | {ge}{run['latency_p99_s']:.2f} | {ge}{run['ttft_p50_s']:.2f} "
                     f"| {ge}{run['ttft_p99_s']:.2f} | {_x(_ratio(run, one))} | {_x(_ratio(run, peft))} |")
    lines += ["", "| target | measured | |", "|---|---|---|"]
    for popularity, label in (("uniform", "uniform"), ("zipf", "skewed")):
        r = _ratio(_find(results, "ours", 64, popularity), one)
        if r is not None:
            lines.append(f"| 64 adapters ({label}) >= {TARGET_ADAPTERS}x the tokens/s of 1 adapter | {r:.2f}x "
                         f"| {'met' if r >= TARGET_ADAPTERS else 'not met'} |")
    for popularity, label in (("uniform", "uniform"), ("zipf", "skewed")):
        r = _ratio(_find(results, "ours", 64, popularity), _find(results, "peft", 64, popularity))
        if r is not None:
            lines.append(f"| 64 adapters ({label}) >= {TARGET_PEFT:g}x the PEFT baseline's tokens/s | {r:.2f}x "
                         f"| {'met' if r >= TARGET_PEFT else 'not met'} |")
    if any(run["lower_bound"] for run in results["runs"]):
        lines += ["", "\">=\": requests still unfinished when the run ended were cancelled; their tokens are not "
                      "counted and they enter the latency percentiles at their age then (a lower bound)."]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = [case(r).replace(", ", "\n", 1) for r in runs]
    colors = ["tab:blue" if r["server"] == "ours" else "tab:orange" for r in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    x = range(len(runs))
    left.bar(x, [r["tokens_per_s"] for r in runs], color=colors)
    left.axhline(results["rate"] * results["max_tokens"], color="grey", linestyle="--", linewidth=1,
                 label=f"offered: {results['rate'] * results['max_tokens']:.0f} tokens/s")
    left.set_ylabel("completion tokens/s")
    left.set_title("throughput (higher is better)")
    left.legend(loc="upper right")
    width = 0.4
    for offset, key, alpha in ((-width / 2, "latency_p50_s", 0.55), (width / 2, "latency_p99_s", 1.0)):
        bars = right.bar([i + offset for i in x], [r[key] for r in runs], width, color=colors, alpha=alpha)
        for bar, run in zip(bars, runs):
            if run["lower_bound"]:
                bar.set_hatch("//")
    right.set_yscale("log")
    right.set_ylabel("end-to-end latency, s (log)")
    right.set_title("latency p50 (light) and p99 (dark); hatched: lower bound")
    for ax in (left, right):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7.5)
    figure.suptitle(f"SmolLM2-135M, LoRA r=16, {results['rate']:g} requests/s offered, 32 tokens each "
                    f"(blue: adapterhub serve, orange: PEFT one request at a time)", fontsize=10)
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
