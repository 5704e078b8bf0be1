"""The rule for preset names: short, lower-case, safe in paths and URLs."""

from __future__ import annotations

import re

VOICE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
NAME_RULE = "must match ^[a-z0-9][a-z0-9_-]{0,63}$ (lower-case letters, digits, - and _)"


def valid_voice_name(name: str) -> bool:
    return bool(VOICE_NAME_RE.fullmatch(name))
