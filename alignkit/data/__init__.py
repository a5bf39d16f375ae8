"""Data layer: read JSONL / parquet / arrow files in the ecosystem's formats and tokenize them.

See `alignkit.data.formats` (reading, format detection, validation), `alignkit.data.templates`
(chat-template rendering with assistant-only loss masks, end-of-turn tokens) and `alignkit.data.render`
(records to token ids, and the loaders the recipes call).
"""

from .formats import FORMATS, DataError, DataStats, detect_format, read_records
from .render import (
    ChatTemplateError,
    Example,
    PreferenceExample,
    PromptExample,
    UnpairedExample,
    has_generation_markers,
    load_preference,
    load_prompts,
    load_sft,
    load_text,
    load_unpaired,
    render_messages,
    render_prompt,
    render_prompt_completion,
)
from .templates import END_OF_TURN_TOKENS, end_of_turn_ids

__all__ = [
    "FORMATS",
    "DataError",
    "DataStats",
    "detect_format",
    "read_records",
    "ChatTemplateError",
    "Example",
    "PreferenceExample",
    "PromptExample",
    "UnpairedExample",
    "has_generation_markers",
    "load_preference",
    "load_prompts",
    "load_sft",
    "load_text",
    "load_unpaired",
    "render_messages",
    "render_prompt",
    "render_prompt_completion",
    "END_OF_TURN_TOKENS",
    "end_of_turn_ids",
]
