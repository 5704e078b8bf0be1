"""XTTS v2 studio speakers: ``speakers_xtts.pth`` in the checkpoint, one built-in voice ``xtts:<slug>`` each.

The file maps a speaker's name to its conditioning latents, ``{"gpt_cond_latent": [1, 32, width],
"speaker_embedding": [1, 512, 1]}`` (XTTS v2 ships 58 speakers). It is read with
``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickle.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPEAKERS_FILE = "speakers_xtts.pth"
LATENT_KEYS = ("gpt_cond_latent", "speaker_embedding")
MAX_SLUG = 64


def speaker_slug(name: str) -> str:
    """A voice id for a speaker name: lower case, whitespace → '-', accents dropped, only [a-z0-9_-],
    starting with a letter or digit (``"Claribel Dervla"`` → ``claribel-dervla``); may be empty."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"\s+", "-", ascii_name.strip().lower())
    slug = re.sub(r"[^a-z0-9_-]", "", slug)
    slug = re.sub(r"-{2,}", "-", slug).lstrip("-_")
    return slug[:MAX_SLUG].rstrip("-_")


@dataclass(frozen=True)
class StudioSpeaker:
    slug: str
    name: str
    gpt_cond_latent: Any  # torch.Tensor, float32, on the CPU
    speaker_embedding: Any


class StudioSpeakers:
    """The speakers of one ``speakers_xtts.pth``, by slug (unique; a clash gets ``-2``, ``-3``, …)."""

    def __init__(self, speakers: list[StudioSpeaker]) -> None:
        self.by_slug = {s.slug: s for s in speakers}

    def __len__(self) -> int:
        return len(self.by_slug)

    def get(self, slug: str) -> StudioSpeaker | None:
        return self.by_slug.get(slug)

    @classmethod
    def read(cls, path: Path) -> StudioSpeakers:
        """Read and check the file; entries that are not two float tensors are skipped with a warning."""
        import torch

        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a mapping of speaker names to latents")
        speakers: list[StudioSpeaker] = []
        taken: set[str] = set()
        for index, (name, latents) in enumerate(data.items()):
            if not (isinstance(name, str) and isinstance(latents, dict)
                    and all(isinstance(latents.get(key), torch.Tensor) for key in LATENT_KEYS)):
                log.warning("%s: skipping entry %r: not {gpt_cond_latent, speaker_embedding} tensors", path,
                            str(name)[:80])
                continue
            gpt, embedding = latents["gpt_cond_latent"], latents["speaker_embedding"]
            if gpt.dim() == 2:
                gpt = gpt.unsqueeze(0)
            if embedding.dim() == 2:
                embedding = embedding.unsqueeze(-1)
            if gpt.dim() != 3 or embedding.dim() != 3:
                log.warning("%s: skipping speaker %r: latents of shapes %s and %s", path, name[:80],
                            tuple(gpt.shape), tuple(embedding.shape))
                continue
            base = speaker_slug(name) or f"speaker-{index + 1}"
            slug, n = base, 1
            while slug in taken:
                n += 1
                slug = f"{base[: MAX_SLUG - len(str(n)) - 1]}-{n}"
            taken.add(slug)
            speakers.append(StudioSpeaker(slug, name, gpt.float().contiguous(), embedding.float().contiguous()))
        return cls(speakers)


class SpeakerCache:
    """The speakers of whichever checkpoint the engine uses, read once per file version (path, size, mtime)."""

    def __init__(self) -> None:
        self._key: tuple[str, int, int] | None = None
        self._speakers = StudioSpeakers([])
        self._lock = threading.Lock()

    def speakers(self, checkpoint: Path | None) -> StudioSpeakers:
        path = checkpoint / SPEAKERS_FILE if checkpoint is not None else None
        try:
            stat = path.stat() if path is not None else None
        except OSError:
            stat = None
        if path is None or stat is None:
            return StudioSpeakers([])
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key == self._key:
                return self._speakers
            try:
                speakers = StudioSpeakers.read(path)
            except Exception as exc:  # a damaged file: no studio voices, the engine still clones
                log.warning("cannot read XTTS studio speakers from %s: %s", path, exc)
                speakers = StudioSpeakers([])
            self._speakers, self._key = speakers, key
            return speakers
