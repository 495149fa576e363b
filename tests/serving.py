"""A tiny served model on disk, its adapters, the offline answers they must give, and
`adapterhub serve` run as a real subprocess on a free loopback port."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import threading
import time

import torch
from tiny_models import LLAMA_TARGETS, broken_copy, save_peft, save_peft_adapter, tiny_llama, tiny_tokenizer

EOS = 1  # tiny_tokenizer's <eos>


def served_llama():
    """tiny_llama whose end-of-sequence token is the tiny tokenizer's, as a served model's would be."""
    model = tiny_llama()
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.bos_token_id, config.pad_token_id = EOS, None, 0
    return model


def make_model_dir(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Writes root/base (model + tokenizer) and adapters under root/adapters: a0 (LoRA r=4, all
    projections), a1 (IA3), a2 (LoRA r=8 on q, v), a3 (LoRA, for loading at runtime) and broken
    (a0 with a wrongly shaped tensor). Returns name -> directory."""
    from peft import IA3Config

    served_llama().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    adapters = root / "adapters"
    dirs = {
        "a0": save_peft_adapter(tiny_llama, adapters / "a0", seed=10, r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
        "a1": save_peft(
            tiny_llama,
            adapters / "a1",
            11,
            IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        ),
        "a2": save_peft_adapter(
            tiny_llama, adapters / "a2", seed=12, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        ),
        "a3": save_peft_adapter(tiny_llama, adapters / "a3", seed=13, r=4, lora_alpha=4, target_modules=LLAMA_TARGETS),
    }
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    dirs["broken"] = broken_copy(
        dirs["a0"], adapters / "broken", tensors=lambda t: t.update({key: t[key][:, :-3].contiguous()})
    )
    return dirs


class Offline:
    """What `Backbone` gives offline (greedy, one prompt at a time) for each adapter."""

    def __init__(self, dirs: dict[str, pathlib.Path]):
        from adapterhub import Backbone

        self.tokenizer = tiny_tokenizer()
        self.backbone = Backbone(served_llama(), max_adapters=8, max_rank=8)
        for name in ("a0", "a1", "a2", "a3"):
            self.backbone.load(dirs[name], name=name)

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def complete(self, adapter: str | None, prompt: str, max_tokens: int, *, ignore_eos: bool = False) -> str:
        """Greedy, recomputing the whole sequence each step (no KV cache): the plainest reference."""
        ids = self.ids(prompt)
        new = []
        with self.backbone.use(adapter), torch.no_grad():
            for _ in range(max_tokens):
                token = int(self.backbone.model(torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(token)
                if token == EOS and not ignore_eos:  # ignore_eos: end of sequence may come, and not stop
                    break
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def chat(self, adapter: str | None, content: str, max_tokens: int) -> str:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return self.complete(adapter, text, max_tokens)


class Server:
    """`adapterhub serve ARGS --port 0` in a subprocess; `url` once it prints that it is ready."""

    def __init__(self, args: list[str], cwd: pathlib.Path, timeout: float = 120.0):
        self.args = args
        self.process = subprocess.Popen(
            [sys.executable, "-m", "adapterhub.cli", "serve", "--port", "0", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.process.stdout:
                self.lines.append(line)
                if line.startswith("adapterhub serve: ready on "):
                    self.url = line.split()[4]
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("adapterhub serve did not start:\n" + "".join(self.lines[-40:]))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def log(self) -> str:
        return "".join(self.lines)


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample in /metrics text (0 if absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def keys_file(path: pathlib.Path) -> pathlib.Path:
    path.write_text(json.dumps({"keys": {"sk-admin": "*", "sk-tenant": ["a0", "tiny"]}}))
    return path


def pad_tokenizer(directory: pathlib.Path) -> pathlib.Path:
    """Saves the tiny tokenizer in `directory` with special tokens <unused_0>.. added until it covers
    the model's whole vocabulary (as real models' tokenizers do). lm-eval's `hf` model with `peft=`
    resizes the embeddings to len(tokenizer) when the two differ, which would drop the logits of
    ids 98..127 from its softmax and make its loglikelihoods differ from any server's. Returns directory."""
    from tiny_models import VOCAB

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(VOCAB - len(tokenizer))], special_tokens=True)
    assert len(tokenizer) == VOCAB
    tokenizer.save_pretrained(directory)
    return directory


def widen_context(directory: pathlib.Path, positions: int = 2048) -> pathlib.Path:
    """Lets the tiny Llama saved in `directory` take `positions` tokens instead of 64 (RoPE: no weight
    depends on it, so its answers do not change), room for a tool prompt or a JSON answer at one
    character a token. Returns directory."""
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (directory / "config.json").write_text(json.dumps(config))
    return directory
