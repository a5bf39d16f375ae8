"""alignkit: the LLM training ladder in readable recipes."""

import os

# alignkit loads local directories only; never reach for the Hub (and never hang on a dead network).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
