"""A model's config as text and as a resolved object, and the one error every source raises.

Kept apart from `sources` (which picks the source) and `hub` (which reads the Hub), so that both
can use them without importing each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class ModelSourceError(ValueError):
    """A model reference that cannot be turned into a config; the message is user-facing, one line.

    Whatever the user typed may be quoted in it, so control characters and line breaks are shown
    escaped: the message always stays on one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(str(message)))


def one_line(text: str) -> str:
    """`text` with every non-printable character (newlines, carriage returns…) written as an escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shorten(text: str, limit: int = 80) -> str:
    """What the user typed, cut to `limit` characters for quoting in a message (a 100 KB argument
    must not come back as a 100 KB error line)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


@dataclass(frozen=True)
class ModelConfig:
    """A resolved config and where it came from."""

    config: dict
    name: str  # what to call it in output
    origin: str  # "catalog" | "file" | "hub" | "hub-cache" | "upload"
    source: str  # URL or path
    notes: tuple[str, ...] = field(default=())
    safetensors_params: dict[str, int] | None = None  # stored parameter counts per dtype, from the Hub


def parse_config_text(text: str, where: str, hint: str = "check the file") -> dict:
    """JSON text → config dict, or a clear error; `hint` says what to do about a broken file."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelSourceError(f"{where} is not valid JSON ({err.msg} at line {err.lineno}); {hint}") from None
    except RecursionError:
        raise ModelSourceError(f"{where} nests too deeply to be a config.json; {hint}") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{where} must hold a JSON object (a config.json), not a {type(data).__name__}; {hint}")
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        raise ModelSourceError(f"{where} has no model_type: it does not look like a transformers config.json; {hint}")
    return data


MAX_CONFIG_BYTES = 4 << 20  # the largest real config.json is tens of KB (DeepSeek-V3's: 1.7 KB)
