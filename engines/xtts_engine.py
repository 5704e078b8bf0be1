"""XTTS v2 through coqui-tts: voice cloning in 16 languages, streaming within a sentence."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tts_gateway.engines.base import (
    BaseEngine,
    Capabilities,
    EngineContext,
    EngineUnavailable,
    ModelInfo,
    SynthesisCancelled,
    SynthesisOptions,
    VoiceInput,
)
from tts_gateway.engines.hookspecs import hookimpl
from tts_gateway.engines.memory import release_memory

REQUIRED_FILES = ("config.json", "model.pth", "vocab.json")
DEFAULT_LANGUAGES = ["en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "ja", "hu", "ko"]
_CHAR_LIMITS = {"en": 250, "de": 253, "fr": 273, "es": 239, "it": 213, "pt": 203, "pl": 224, "zh": 82,
                "ar": 166, "cs": 186, "ru": 182, "nl": 251, "tr": 226, "ja": 71, "hu": 224, "ko": 95, "hi": 150}
_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a (large) file, memoised by path, size and mtime."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def resolve_device(setting: str, engine: str = "xtts") -> str:
    """The torch device for ``TTS_GATEWAY_DEVICE``; `EngineUnavailable` (one line, with the fix) when the
    installed torch cannot use it, e.g. ``cuda`` with a CPU-only build."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        if not torch.backends.cuda.is_built():
            raise EngineUnavailable(engine, f"TTS_GATEWAY_DEVICE={setting}, but the installed torch "
                                            f"{torch.__version__} is a CPU-only build; install a CUDA build with "
                                            "`make install TORCH=cuda` (or set TTS_GATEWAY_DEVICE=cpu)")
        if not torch.cuda.is_available():
            raise EngineUnavailable(engine, f"TTS_GATEWAY_DEVICE={setting}, but torch sees no CUDA GPU "
                                            "(driver missing or no GPU); set TTS_GATEWAY_DEVICE=cpu or auto")
        index = int(setting.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise EngineUnavailable(engine, f"TTS_GATEWAY_DEVICE={setting}, but torch sees only "
                                            f"{torch.cuda.device_count()} GPU(s)")
    return setting


class XttsEngine(BaseEngine):
    """Coqui XTTS v2 (or the tiny test checkpoint) from a checkpoint directory."""

    name = "xtts"
    capabilities = Capabilities(cloning=True, streaming=True, deterministic=False, native_speed=True)
    reference_sample_rate = 22050

    def __init__(self, checkpoint: Path | None, device: str = "auto", threads: int = 0) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.device_setting = device
        self.threads = threads
        self._model: Any = None
        self._lock = threading.Lock()  # one inference at a time: torch's RNG is process-global

    # -- description ---------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return int(self._config().get("model_args", {}).get("output_sample_rate", 24000))

    @property
    def languages(self) -> list[str]:
        return list(self._config().get("languages") or DEFAULT_LANGUAGES)

    @property
    def model(self) -> ModelInfo:
        if self.checkpoint is None or not (self.checkpoint / "model.pth").is_file():
            return ModelInfo(id="xtts_v2", sha256=None, licence="CPML")
        return ModelInfo(id=f"xtts_v2/{self.checkpoint.name}", sha256=file_sha256(self.checkpoint / "model.pth"),
                         licence="CPML (Coqui Public Model License)")

    def _config(self) -> dict[str, Any]:
        if self.checkpoint is None:
            return {}
        try:
            data = json.loads((self.checkpoint / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def availability(self) -> tuple[bool, str | None]:
        if self.checkpoint is None:
            return False, ("no checkpoint configured: set TTS_GATEWAY_XTTS_CHECKPOINT to a directory with "
                           "config.json, model.pth and vocab.json (or build a test one with "
                           "`tts-gateway dev tiny-xtts DIR`)")
        if not self.checkpoint.is_dir():
            return False, f"TTS_GATEWAY_XTTS_CHECKPOINT={self.checkpoint} does not exist (or is not a directory)"
        missing = [name for name in REQUIRED_FILES if not (self.checkpoint / name).is_file()]
        if missing:
            return False, f"checkpoint {self.checkpoint} lacks {', '.join(missing)}"
        return True, None

    def max_chars(self, language: str) -> int:
        return _CHAR_LIMITS.get(language.split("-")[0], 250)

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        ok, reason = self.availability()
        if not ok:
            raise EngineUnavailable(self.name, reason or "unavailable")
        assert self.checkpoint is not None
        import torch

        from tts_gateway.engines.torch_compat import import_torchaudio

        device = resolve_device(self.device_setting, self.name)  # before any weights are read
        import_torchaudio()
        from TTS.tts.configs.xtts_config import XttsConfig
        from TTS.tts.models.xtts import Xtts

        if self.threads:
            torch.set_num_threads(self.threads)
        config = XttsConfig()
        config.load_json(str(self.checkpoint / "config.json"))
        model = Xtts(config)
        # coqui-tts reads model.pth with torch.load(weights_only=True).
        model.load_checkpoint(config, checkpoint_dir=str(self.checkpoint), eval=True)
        model.to(device)
        self._model = model
        self._loaded = True

    def unload(self) -> None:
        with self._lock:
            self._model = None
            self._loaded = False
        release_memory()

    # -- work ----------------------------------------------------------------------------------
    def compute_latents(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        """Conditioning latents from mono float32 audio at 22.05 kHz (decoded by soundfile)."""
        import soxr
        import torch

        model = self._require_model()
        wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, :]
        wav16 = torch.from_numpy(soxr.resample(audio, self.reference_sample_rate, 16000).astype(np.float32))[None, :]
        config = model.config
        with self._lock, torch.inference_mode():
            gpt_cond_latent = model.get_gpt_cond_latents(
                wav, self.reference_sample_rate,
                length=int(getattr(config, "gpt_cond_len", 30)),
                chunk_length=int(getattr(config, "gpt_cond_chunk_len", 4)),
            )
            # Already at 16 kHz, so coqui's torchaudio resample is a no-op.
            speaker_embedding = model.get_speaker_embedding(wav16, 16000)
        return {
            "gpt_cond_latent": gpt_cond_latent.detach().cpu().numpy().astype(np.float32),
            "speaker_embedding": speaker_embedding.detach().cpu().numpy().astype(np.float32),
        }

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        import torch

        self.check_language(options.language)
        if voice.latents is None:
            raise EngineUnavailable(self.name, "XTTS needs a cloned voice (a preset or reference audio)")
        model = self._require_model()
        device = next(model.parameters()).device
        gpt_cond_latent = torch.from_numpy(np.asarray(voice.latents["gpt_cond_latent"])).to(device)
        speaker_embedding = torch.from_numpy(np.asarray(voice.latents["speaker_embedding"])).to(device)
        with self._lock:
            torch.manual_seed(options.seed or 0)
            stream = model.inference_stream(
                text, options.language, gpt_cond_latent, speaker_embedding,
                speed=options.speed, enable_text_splitting=False,
                # Each streamed chunk re-decodes every token so far; unstreamed, decode once.
                stream_chunk_size=20 if options.streaming else 0,
            )
            try:
                for chunk in stream:
                    if options.cancel.is_set():
                        raise SynthesisCancelled("cancelled")
                    yield chunk.detach().cpu().numpy().astype(np.float32).reshape(-1)
            finally:
                stream.close()

    def _require_model(self) -> Any:
        model = self._model
        if model is None:
            raise EngineUnavailable(self.name, "model is not loaded")
        return model


@hookimpl(trylast=True)
def register_engines(register: Callable[[Any], None], context: EngineContext) -> None:
    register(XttsEngine(context.options.get("xtts_checkpoint"), device=context.device, threads=context.threads))
