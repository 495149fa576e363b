"""The serving engine on one GPU (issue 15's GPU benchmark; run by bench/gpu_serve.sh on a lent device).

A Llama-shaped model of about 1.1B parameters (TinyLlama's shape: 22 layers, hidden 2048, 32 heads,
4 KV heads, MLP 5632, vocab 32000) built from its config with random weights (no download; weights do
not matter for speed), bf16; 1, 64 and 512 random LoRA adapters, r=16 on all 7 projections, written
once to a directory in PEFT's layout by the LoRA type itself. For each adapter count: saturation
(REQUESTS requests at once, prompts of 128-256 tokens, 64 tokens each, greedy, ignore_eos) as
tokens/s, TTFT p50/p99, the decode capacity (one step of max_batch decode rows, timed alone) and the
KV blocks used at peak. Writes a markdown table to OUT/gpu_serve_<device>.md.

    python -m bench.serve.gpu_engine --out bench/results            (GPU)
    python -m bench.serve.gpu_engine --tiny --out /tmp/gpu-serve    (a CPU smoke run of the same code)
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
import threading
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adapterhub import Backbone
from adapterhub.plugins import get_type
from adapterhub.serve.engine import Engine, Finished, Token
from adapterhub.serve.sampling import Sampling
from bench.serve.decode_step import decode_step_seconds

SHAPES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def device_slug(name: str) -> str:
    """A device's name as the GPU benchmarks' file names spell it ("NVIDIA H100 80GB HBM3" ->
    "nvidia-h100-80gb-hbm3"); bench/gpu_check.sh makes the same with sed."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def build(shape: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    kv_heads = 4 if shape == "1.1b" else 2
    config = LlamaConfig(vocab_size=32000, num_key_value_heads=kv_heads, max_position_embeddings=2048, **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    for module in model.modules():  # small random weights keep activations finite in bf16
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=0.02)
    return model


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A tokenizer with one word per id (the engine decodes text as it streams)."""
    words = {f"w{i}": i for i in range(vocab)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="w0", eos_token="w1", unk_token="w0")


def write_adapters(model, count: int, root: Path) -> list[Path]:
    """`count` random LoRA adapters (r=16, all projections) in PEFT's layout, written by the LoRA type."""
    lora = get_type("lora")
    paths = []
    for k in range(count):
        adapter = lora.init(model, {"r": 16, "lora_alpha": 32, "target_modules": TARGETS})
        g = torch.Generator().manual_seed(k)
        for parts in adapter.modules.values():
            for tensor in parts.values():
                if tensor.dim() > 0 and tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.02)
        lora.write(adapter, root / f"a{k:04d}")
        paths.append(root / f"a{k:04d}")
    return paths


def saturate(engine: Engine, names: list[str | None], prompts: list[list[int]], tokens: int) -> dict:
    first, submitted, done = {}, {}, threading.Semaphore(0)
    sampling = Sampling(max_tokens=tokens, temperature=0, ignore_eos=True)
    peak = [0]

    def on_event(k):
        def handle(event):
            if isinstance(event, Token | Finished) and k not in first:
                first[k] = time.perf_counter()
            if isinstance(event, Finished):
                peak[0] = max(peak[0], engine.kv.blocks.used())
                done.release()

        return handle

    start = time.perf_counter()
    for k, prompt in enumerate(prompts):
        submitted[k] = time.perf_counter()
        engine.submit(names[k % len(names)], prompt, sampling, on_event(k))
    for _ in prompts:
        assert done.acquire(timeout=600)
    wall = time.perf_counter() - start
    ttft = sorted(first[k] - submitted[k] for k in first)
    return {
        "tokens_per_s": len(prompts) * tokens / wall,
        "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "kv_blocks_peak": peak[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (smoke run)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--compile", action="store_true", help="steps through torch.compile (inductor)")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = "tiny" if args.tiny else "1.1b"
    requests, tokens = (16, 8) if args.tiny else (args.requests, 64)
    max_batch = 8 if args.tiny else args.max_batch
    model = build(shape, device, dtype)
    rng = random.Random(0)
    lengths = (8, 24) if args.tiny else (128, 256)
    prompts = [[rng.randrange(2, 32000) for _ in range(rng.randint(*lengths))] for _ in range(requests)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(model, max(args.adapters), Path(tmp))
        del model
        for count in args.adapters:
            backbone = Backbone(build(shape, device, dtype), max_adapters=count, max_rank=16)  # a fresh model each
            engine = Engine(
                backbone,
                word_tokenizer(32000),
                base_name="llama",
                max_batch=max_batch,
                max_step_tokens=max(max_batch, 64 if args.tiny else 4096),
                compile="inductor" if args.compile else None,
            )
            names = [f"a{k:04d}" for k in range(count)]
            start = time.perf_counter()
            for name, path in zip(names, paths):
                engine.add_adapter(name, str(path))
            loaded = time.perf_counter() - start
            residents = [engine._adapters[names[k % count]].resident for k in range(max_batch)]
            capacity = max_batch / decode_step_seconds(engine, residents, 16 if args.tiny else 256, runs=7, warmup=2)
            engine.start()
            try:
                result = saturate(engine, names, prompts, tokens)
            finally:
                engine.stop()
            rows.append({"adapters": count, "load_s": loaded, "capacity": capacity, **result})
            print(rows[-1], flush=True)
            del engine, backbone
    name = ("cpu-tiny" if args.tiny else device_slug(torch.cuda.get_device_name())) + (
        "_compiled" if args.compile else ""
    )
    lines = [
        f"## gpu_serve ({name})",
        "",
        f"Llama {shape} random weights, {dtype}, LoRA r=16 x 7 projections; {requests} requests at once, "
        f"prompts {lengths[0]}-{lengths[1]} tokens, {tokens} tokens each; max_batch {max_batch}.",
        "",
        "| adapters | tokens/s | decode capacity tokens/s | efficiency | TTFT p50 s | TTFT p99 s | KV blocks peak "
        "| load s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['adapters']} | {r['tokens_per_s']:.0f} | {r['capacity']:.0f} "
            f"| {r['tokens_per_s'] / r['capacity']:.2f} "
            f"| {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['kv_blocks_peak']} | {r['load_s']:.1f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_serve_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
