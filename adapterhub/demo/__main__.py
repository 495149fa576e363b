"""`python -m adapterhub.demo`: the demo adapters served on SmolLM2, one mixed batch (adapterhub/demo/serve.py)."""

import sys

from .serve import main

sys.exit(main())
