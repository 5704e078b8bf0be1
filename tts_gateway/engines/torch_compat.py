"""Make coqui-tts importable on this torch.

coqui-tts refuses to import without the torchaudio and torchcodec packages, but the newest
torchaudio's compiled extension is built for an older torch and fails to load. XTTS inference
only needs torchaudio's pure-Python parts (mel transforms), so when the extension fails we put
a stub ``torchaudio._extension`` in place before importing torchaudio. Audio is never loaded
through torchaudio here (we decode with soundfile).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def _fail_if_no_align(func: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torchaudio alignment is not available in this build")

    return wrapped


def import_torchaudio() -> Any:
    """Import torchaudio, stubbing its compiled extension when that cannot load."""
    if "torchaudio" in sys.modules:
        return sys.modules["torchaudio"]
    try:
        return importlib.import_module("torchaudio")
    except OSError:
        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchaudio._extension")
        stub._IS_TORCHAUDIO_EXT_AVAILABLE = False  # type: ignore[attr-defined]
        stub._IS_ALIGN_AVAILABLE = False  # type: ignore[attr-defined]
        stub.fail_if_no_align = _fail_if_no_align  # type: ignore[attr-defined]
        stub._check_cuda_version = lambda: None  # type: ignore[attr-defined]
        sys.modules["torchaudio._extension"] = stub
        return importlib.import_module("torchaudio")
