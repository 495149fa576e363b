"""The demo: SmolLM2-135M-Instruct serving three small LoRA adapters and the base in one batch.

data.py       the demo adapters' training data (upper case, a JSON object, numbers as words)
adapters.py   the demo adapters: shipped in shipped/, or trained by the seeded recipe into a cache
serve.py      `make demo` / `python -m adapterhub.demo`: them served by `adapterhub serve`, one mixed batch
"""
