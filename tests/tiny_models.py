"""Tiny backbones built from transformers configs, and PEFT adapters saved for them.

Each builder seeds its own weights, so calling it twice gives two identical models:
one for adapterhub, one for PEFT (which wraps the model it is given).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 128


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_cls() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_peft_adapter(build, directory: pathlib.Path, seed: int, **lora_kwargs) -> pathlib.Path:
    """Saves a PEFT LoRA adapter for `build()` with random (nonzero) weights; returns the directory."""
    from peft import LoraConfig

    return save_peft(build, directory, seed, LoraConfig(**lora_kwargs))


def save_peft(build, directory: pathlib.Path, seed: int, config) -> pathlib.Path:
    """Saves a PEFT adapter of any type for `build()`, every trainable tensor random (scales around 1),
    so that no factor initialised to zero or one hides a mistake; returns the directory."""
    from peft import get_peft_model

    model = get_peft_model(build(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                around_one = any(k in name for k in ("magnitude", "ia3_l"))
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if around_one else 0.0))
    model.save_pretrained(directory)
    return pathlib.Path(directory)


def peft_model(build, directory: pathlib.Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(build(), directory).eval()


def tiny_tokenizer():
    """A real character-level tokenizer for the tiny models: one token per printable ASCII character,
    plus <pad>, <eos> and <unk> (ids 0..2), all within VOCAB; decoding joins the characters, and a
    ChatML-style chat template turns messages into "<role>: content" lines."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{chr(c): c - 29 for c in range(32, 127)}}  # ' ' -> 3 .. '~' -> 97
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def broken_copy(src: pathlib.Path, dst: pathlib.Path, *, tensors=None, config=None, files=None) -> pathlib.Path:
    """A copy of the adapter at src, its tensors dict, config dict or files changed in place by the given functions."""
    shutil.copytree(src, dst)
    if tensors:
        state = load_file(dst / "adapter_model.safetensors")
        tensors(state)
        save_file(state, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    if config:
        data = json.loads((dst / "adapter_config.json").read_text())
        config(data)
        (dst / "adapter_config.json").write_text(json.dumps(data))
    if files:
        files(dst)
    return dst
