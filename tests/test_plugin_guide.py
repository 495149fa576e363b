"""docs/writing-a-plugin.md is true: its package, copied out of the page and pip-installed into a
temporary directory, is discovered, listed and loads adapters that batch with PEFT LoRA rows, per row
and packed (the server's steps)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

GUIDE = Path(__file__).parent.parent / "docs" / "writing-a-plugin.md"

SCRIPT = r"""
import sys
from pathlib import Path
import torch
import adapterhub as ah
from adapterhub.plugins import get_type
from tiny_models import ids, save_peft_adapter, tiny_llama

out = Path(sys.argv[1])
model = tiny_llama()
bias = get_type("bias")
path = "model.layers.0.mlp.down_proj"
adapter = bias.init(model, {"target_modules": [path]})
adapter.modules[path]["bias"] += torch.linspace(-1, 1, 32)
bias.write(adapter, out / "my-bias")

bb = ah.Backbone(model, max_adapters=4, max_rank=8)
bb.load(out / "my-bias", name="shifted")
bb.load(save_peft_adapter(tiny_llama, out / "lora", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"]), name="lora")
batch = ids(batch=3)
with torch.no_grad(), bb.use(["shifted", "lora", None]):
    together = model(batch).logits

reference = tiny_llama()  # the same bias added by hand
reference.get_submodule(path).register_forward_hook(lambda m, a, y: y + torch.linspace(-1, 1, 32))
with torch.no_grad():
    want = reference(batch[:1]).logits[0]
    base = tiny_llama()(batch[2:]).logits[0]
    with bb.use("lora"):
        lora = model(batch[1:2]).logits[0]
torch.testing.assert_close(together[0], want, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(together[1], lora, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(together[2], base, rtol=1e-5, atol=1e-5)
# The server's packed steps: the three rows as one sequence (each attending to itself only, through the
# engine's paged attention), each token routed to its row's adapter.
from adapterhub.serve.paged import Chunk, KVPool, Step, use_paged_attention
T = batch.size(1)
use_paged_attention(model)
step = Step(KVPool(model, 3, 16), [Chunk([k], 0, T) for k in range(3)], torch.device("cpu"))
with torch.no_grad(), bb.use(["shifted", "lora", None], lengths=[T] * 3):
    packed = model(input_ids=batch.reshape(1, -1), **step.inputs()).logits[0]
torch.testing.assert_close(packed.view(3, T, -1), together, rtol=1e-5, atol=1e-5)
assert bb.info("shifted").type == "bias"
bb.save("shifted", out / "saved")
assert torch.equal(bias.read(out / "saved").modules[path]["bias"], adapter.modules[path]["bias"])
print("guide ok")
"""


def guide_files() -> dict[str, str]:
    """The code blocks of the guide that start with '# file: NAME'."""
    blocks = re.findall(r"```(?:python|toml)\n# file: (\S+)\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return {name: body for name, body in blocks}


def test_the_guide_plugin_installs_lists_and_loads(tmp_path):
    files = guide_files()
    assert set(files) == {"pyproject.toml", "adapterhub_bias.py"}
    package, site = tmp_path / "adapterhub-bias", tmp_path / "site"
    package.mkdir()
    for name, body in files.items():
        (package / name).write_text(body)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parent)])}

    listing = subprocess.run(
        [sys.executable, "-m", "adapterhub.cli", "plugins", "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    row = {t["name"]: t for t in json.loads(listing)["types"]}["bias"]
    assert (row["distribution"], row["version"]) == ("adapterhub-bias", "0.1.0")
    assert row["hooks"] == ["adapter_types", "recognize_adapter"]

    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "guide ok" in run.stdout, run.stderr[-3000:]
