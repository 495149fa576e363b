"""`make demo`: the demo adapters (shipped, or retrained into the cache) served by `adapterhub serve` on
the embedded SmolLM2, one mixed batch sent through the openai client, the answers side by side.

    python -m adapterhub.demo          # then keeps serving; DEMO_EXIT=1 exits instead
    DEMO_PORT=8001 python -m adapterhub.demo
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import textwrap
import threading
import time

from ..serve.startup import READY, free_port
from . import adapters as demo_adapters

QUESTIONS = ["How many legs does a cat have?", "What is 12 plus 30?"]
MAX_TOKENS = 48


def start_server(directory, port: int) -> tuple[subprocess.Popen, str]:
    names = list(demo_adapters.cached(directory)["adapters"])
    args = [sys.executable, "-m", "adapterhub.cli", "serve", "--port", str(port), "--max-rank", "16"]
    for name in names:
        args += ["--adapter", f"{name}={directory / name}"]
    quiet = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}  # no progress bars
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=quiet)
    for line in server.stdout:
        if line.startswith(READY):
            threading.Thread(
                target=lambda: [print(f"[server] {rest}", end="") for rest in server.stdout], daemon=True
            ).start()
            return server, line.split()[4]
        print(f"[server] {line}", end="")
    raise SystemExit(f"the server exited with status {server.wait()} before it was ready (its output is above)")


def mixed_batch(url: str, models: list[str]) -> tuple[list, float]:
    """Every question to every model at once, so that they share the server's forwards."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="demo", max_retries=0, timeout=300)
    jobs = [(model, q) for q in QUESTIONS for model in models]

    def ask(job):
        model, question = job
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, temperature=0
        )

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    return list(zip(jobs, answers)), time.perf_counter() - started


def show(results: list, seconds: float) -> None:
    tokens = sum(answer.usage.completion_tokens for _, answer in results)
    for question in QUESTIONS:
        print(f"\n> {question}")
        for (model, q), answer in results:
            if q == question:
                text = " ".join(answer.choices[0].message.content.split())
                print(textwrap.fill(text, 100, initial_indent=f"  {model:<24}", subsequent_indent=" " * 26))
    print(
        f"\n{len(results)} requests ({len(results) // len(QUESTIONS)} models) in one continuous batch: "
        f"{tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s"
    )


def main() -> int:
    # the cache if `adapterhub demo-adapters --force` filled it, else the shipped set
    directory = demo_adapters.ensure()
    server, url = start_server(directory, free_port("127.0.0.1", int(os.environ.get("DEMO_PORT", "8000"))))
    try:
        import openai

        base = openai.OpenAI(base_url=url, api_key="demo").models.list().data
        models = [m.id for m in base]
        print(f"serving {models[0]} with adapters {', '.join(models[1:])} at {url}")
        show(*mixed_batch(url, models))
        if os.environ.get("DEMO_EXIT") == "1":
            return 0
        print(
            f"\nStill serving at {url} (Ctrl-C stops). Try:\n"
            f"  curl {url}/chat/completions -H 'Content-Type: application/json' -d "
            f'\'{{"model": "{models[1]}", "messages": [{{"role": "user", "content": "Name a red fruit."}}]}}\'',
            flush=True,
        )
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
