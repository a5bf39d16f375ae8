"""alignkit: the LLM training ladder in readable recipes."""

__version__ = "0.1.0"
