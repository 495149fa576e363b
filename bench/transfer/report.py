"""results.json -> the table in README.md (between its markers) and accuracy.png.

python -m bench.transfer.report     (redraws both from the committed results.json)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from . import topics

HERE = Path(__file__).parent
START, END = "<!-- results: written by bench/transfer/report.py -->", "<!-- end of results -->"


def table(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}. Seed {results['seed']}, batch {results['batch_size']}; "
        f"test: {results['test_examples']} sentences in new words, seen: {results['seen_examples']} held-out "
        f"sentences in the training words. Whole run: {results['total_seconds'] / 60:.1f} min.",
        "",
        "| examples | strategy | test accuracy (new words) | seen-words accuracy | trainable parameters "
        "| saved result | fit s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['examples']} ({r['epochs']} epochs) | {r['strategy']} | **{r['test_accuracy']:.1%}** | "
            f"{r['seen_accuracy']:.1%} | {r['trainable_parameters']:,} | {_size(r['saved_bytes'])} | "
            f"{r['seconds']:.0f} |"
        )
    lines.append("")
    for size in sorted({r["examples"] for r in results["runs"]}):
        runs = [r for r in results["runs"] if r["examples"] == size]
        best = max(runs, key=lambda r: r["test_accuracy"])
        scratch = [r for r in runs if r["strategy"] == "from scratch"]
        worst = min((r for r in runs if r["strategy"] != "from scratch"), key=lambda r: r["test_accuracy"])
        versus = (
            (
                f"; from scratch {scratch[0]['test_accuracy']:.1%} (and {scratch[0]['seen_accuracy']:.1%} on the "
                f"training words, train loss {scratch[0]['final_train_loss']:.2f})"
            )
            if scratch
            else ""
        )
        lines.append(
            f"- {size} examples: pretrained from {worst['test_accuracy']:.1%} ({worst['strategy']}) to "
            f"{best['test_accuracy']:.1%} ({best['strategy']}) on new words{versus}; chance is "
            f"{1 / len(topics.LABELS):.0%}, a uniform guess has loss {math.log(len(topics.LABELS)):.2f}."
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    names = list(dict.fromkeys(r["strategy"] for r in results["runs"]))
    for ax, split, title in (
        (axes[0], "test", "test: words never seen in training"),
        (axes[1], "seen", "held out, in the training words"),
    ):
        for name in names:
            runs = sorted((r for r in results["runs"] if r["strategy"] == name), key=lambda r: r["examples"])
            style = "k--" if name == "from scratch" else "-"
            ax.plot(
                [r["examples"] for r in runs], [r[f"{split}_accuracy"] for r in runs], style, marker="o", label=name
            )
        ax.axhline(1 / len(topics.LABELS), color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xticks([r["examples"] for r in results["runs"] if r["strategy"] == names[0]])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("labelled training examples")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (4 topics, chance dotted)")
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle("all-MiniLM-L6-v2 on a 4-topic task, against the same model from scratch")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(results: dict) -> None:
    """Rewrites the block between README.md's markers and accuracy.png."""
    readme = HERE / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} lost its results markers ({START} ... {END}); put them back where the table goes")
    head, rest = text.split(START, 1)
    readme.write_text(f"{head}{START}\n{table(results)}\n{END}{rest.split(END, 1)[1]}")
    plot(results, HERE / "accuracy.png")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


if __name__ == "__main__":
    write(json.loads((HERE / "results.json").read_text()))
