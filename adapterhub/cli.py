"""`adapterhub ...` on the command line.

adapterhub plugins [--json]     the installed adapter types, their plugins and hooks
adapterhub train [--config run.toml] [--flag value ...]   train an adapter (or a model): adapterhub/train/run.py
adapterhub demo-adapters [--cache-dir DIR] [--force] [--samples]   the demo adapters: adapterhub/demo/adapters.py
adapterhub serve [--adapter NAME=SOURCE ...] [--port 8000] ...   the OpenAI-compatible server: adapterhub/serve/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .plugins import registry
from .serve import run as serve_run


def plugins(as_json: bool) -> int:
    types, failures = registry().listing(), registry().failures()
    if as_json:
        print(json.dumps({"types": [asdict(t) for t in types], "failures": [asdict(f) for f in failures]}, indent=2))
        return 0
    for t in types:
        dist = f"{t.distribution} {t.version}".strip() or "(registered in code)"
        print(f"{t.name:<16} {dist:<24} aliases: {', '.join(t.aliases) or '-':<16} hooks: {', '.join(t.hooks)}")
        if t.description:
            print(f"{'':<16} {t.description}")
        print(f"{'':<16} composes by: {', '.join(t.composition_methods) or '(cannot compose)'}")
    for f in failures:
        print(f"skipped plugin {f.plugin!r} ({f.distribution or 'unknown distribution'}): {f.error}", file=sys.stderr)
    return 0


def train(args: argparse.Namespace) -> int:
    from .train.errors import TrainingError
    from .train.run import KEYS, read_config, run

    try:
        config = read_config(args.config) if args.config else {}
        config.update({k: v for k, v in vars(args).items() if k in KEYS and v is not None})
        result = run(config)
    except TrainingError as e:
        print(f"adapterhub train: {e}", file=sys.stderr)
        return 2
    for entry in result.history:
        print(json.dumps(entry))
    if config.get("output_dir"):
        print(f"best result ({result.best}) in {config['output_dir']}/best")
    return 0


def _train_parser(commands) -> None:
    parser = commands.add_parser("train", help="train an adapter or a model (flags override --config)")
    parser.add_argument("--config", help="a .toml, .yaml or .json file of the settings below")
    parser.add_argument("--model", help='"smollm2" (the embedded default), a directory or a Hub id')
    parser.add_argument("--task", choices=["causal_lm", "classification"])
    parser.add_argument("--num-labels", dest="num_labels", type=int)
    parser.add_argument(
        "--strategy", choices=["feature_extraction", "full", "discriminative", "progressive", "adapter", "domain"]
    )
    parser.add_argument("--adapter-type", dest="adapter_type", help="any installed type (adapterhub plugins)")
    parser.add_argument("--adapter-config", dest="adapter_config", type=json.loads, help="JSON, e.g. '{\"r\": 8}'")
    parser.add_argument("--data", help="training examples, .jsonl")
    parser.add_argument("--eval-data", dest="eval_data")
    parser.add_argument("--domain-data", dest="domain_data", help="unlabelled target-domain text, one per line")
    parser.add_argument("--output-dir", dest="output_dir")
    for flag, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("seed", int), ("max-length", int)):
        parser.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=kind)
    parser.add_argument("--chat", action="store_true", default=None, help="prompts through the chat template")


def demo(args: argparse.Namespace) -> int:
    from .demo import adapters as demo_adapters

    started = time.perf_counter()
    cache = Path(args.cache_dir) if args.cache_dir else None
    was_cached = demo_adapters.cached(cache or demo_adapters.default_dir()) is not None
    directory = demo_adapters.ensure(cache, force=args.force)
    manifest = demo_adapters.cached(directory)
    if directory == demo_adapters.SHIPPED:
        how = "shipped with adapterhub"
    elif args.force or not was_cached:
        how = f"trained in {time.perf_counter() - started:.1f} s"
    else:
        how = "cached"
    print(f"demo adapters in {directory} ({how}; base model {manifest['base_model']})")
    for name, description in manifest["adapters"].items():
        print(f"  {name:<8} {directory / name}  {description}")
    if args.samples:
        from .default_model import load_default

        model, tokenizer = load_default()
        backbone = demo_adapters.backbone(directory, model)
        names = [None, *manifest["adapters"]]
        replies = demo_adapters.replies(backbone, tokenizer, manifest["sample_prompts"], names)
        for k, prompt in enumerate(manifest["sample_prompts"]):
            print(f"\n> {prompt}")
            for name in names:
                print(f"  {name or 'base':<8} {replies[name][k]!r}")
    return 0


def _demo_parser(commands) -> None:
    parser = commands.add_parser("demo-adapters", help="where the demo adapters are (shipped, or trained into a cache)")
    parser.add_argument(
        "--cache-dir",
        dest="cache_dir",
        help="the cache (default: $ADAPTERHUB_DEMO_ADAPTERS_DIR, else "
        "$XDG_CACHE_HOME/adapterhub/demo-adapters, else ~/.cache/adapterhub/demo-adapters); "
        "given and empty, they are trained into it",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="train them again into the cache (a few minutes), which is then used instead of the shipped ones",
    )
    parser.add_argument(
        "--samples",
        action="store_true",
        help="then print greedy replies of the base model and each adapter to a few prompts",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adapterhub", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("plugins", help="list the installed adapter types")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    _train_parser(commands)
    _demo_parser(commands)
    serve_run.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_run.serve(args)
    if args.command == "train":
        return train(args)
    if args.command == "demo-adapters":
        return demo(args)
    logging.getLogger("adapterhub").addHandler(logging.NullHandler())  # failures are printed below instead
    return plugins(args.json)


if __name__ == "__main__":
    sys.exit(main())
