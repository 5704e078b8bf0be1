"""XTTS v2 through coqui-tts: voice cloning in 16 languages, studio speakers, streaming within a sentence
at linear cost (`tts_gateway.engines.xtts_streaming`).

The checkpoint is ``TTS_GATEWAY_XTTS_CHECKPOINT`` when set; otherwise the model coqui-tts's model manager
keeps in the Hugging Face cache, fetched in the background on first load once its licence is accepted
(`tts_gateway.engines.xtts_models`). ``speakers_xtts.pth`` in the checkpoint gives read-only built-in
voices ``xtts:<slug>`` (`tts_gateway.engines.xtts_speakers`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tts_gateway.engines.base import (
    BaseEngine,
    BuiltinVoice,
    Capabilities,
    EngineContext,
    EngineUnavailable,
    ModelInfo,
    SynthesisCancelled,
    SynthesisOptions,
    VoiceInput,
)
from tts_gateway.engines.files import file_sha256
from tts_gateway.engines.hookspecs import hookimpl
from tts_gateway.engines.memory import release_memory
from tts_gateway.engines.scheduling import shared_budget
from tts_gateway.engines.torch_thread import narrow_thread, torch_thread
from tts_gateway.engines.xtts_batching import (
    DEFAULT_MAX_BATCH,
    GptBatcher,
    GptStack,
    Sequence,
    lent_while_seated,
    probe_step,
)
from tts_gateway.engines.xtts_kernels import prepare, prepare_decoder
from tts_gateway.engines.xtts_models import (
    REQUIRED_FILES,
    CoquiModel,
    HubProbe,
    ModelDownload,
    cached_checkpoint,
    coqui_model,
    hub_cache_dir,
    hub_endpoint,
    hub_offline,
    licence_accepted,
    not_accepted_reason,
)
from tts_gateway.engines.xtts_speakers import SPEAKERS_FILE, SpeakerCache
from tts_gateway.engines.xtts_streaming import CHUNK_TOKENS, FIRST_CHUNK_TOKENS, decode_latents, text_tokens
from tts_gateway.errors import NotFound

log = logging.getLogger(__name__)

LICENCE = "CPML (Coqui Public Model License)"
# Retry-After while XTTS v2 downloads: often enough to notice the end, rarely enough not to matter.
DOWNLOAD_POLL_S = 10
DEFAULT_LANGUAGES = ["en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "ja", "hu", "ko"]
_CHAR_LIMITS = {"en": 250, "de": 253, "fr": 273, "es": 239, "it": 213, "pt": 203, "pl": 224, "zh": 82,
                "ar": 166, "cs": 186, "ru": 182, "nl": 251, "tr": 226, "ja": 71, "hu": 224, "ko": 95, "hi": 150}
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


class HubModel:
    """XTTS v2 from coqui-tts's model manager: the cached snapshot, or a background download of it."""

    def __init__(self, accept: bool, model: CoquiModel | None = None) -> None:
        self.model = model or coqui_model()
        self.accept = accept
        self.download = ModelDownload(self.model)
        self.probe = HubProbe(self.model)
        self.retry_after_s: int | None = None  # what the last availability() said about asking again
        self._found: Path | None = None

    def checkpoint(self) -> Path | None:
        """The complete cached snapshot, if any (disk only; remembered while its model.pth exists)."""
        found = self._found
        if found is not None and all((found / name).is_file() for name in REQUIRED_FILES):
            return found
        self._found = cached_checkpoint(self.model)
        return self._found

    def accepted(self) -> bool:
        return licence_accepted(self.model, self.accept)

    def availability(self) -> tuple[bool, str | None]:
        """(ok, reason): ok when the model is here or can be fetched now (licence accepted, hub answering,
        no failed download waiting out its backoff). `retry_after` then says when asking again makes sense."""
        ok, reason, self.retry_after_s = self._status()
        return ok, reason

    def _status(self) -> tuple[bool, str | None, int | None]:
        download = self.download
        if download.running:
            return False, download.describe(), DOWNLOAD_POLL_S
        if self.checkpoint() is not None:
            return True, None, None
        if not self.accepted():
            return False, not_accepted_reason(self.model), None
        if hub_offline():
            return False, (f"XTTS v2 ({self.model.repo_id}) is not in the Hugging Face cache {hub_cache_dir()} and "
                           "HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE (HF_ENDPOINT may name a "
                           "mirror), or point HF_HOME at a cache that has it"), None
        if download.state == "failed" and download.retry_in() > 0:
            return False, download.describe(), max(1, math.ceil(download.retry_in()))
        reach = self.probe.reach()
        if not reach.ok:
            wait = max(1, math.ceil(reach.recheck_in()))
            return False, (f"XTTS v2 is not downloaded and {hub_endpoint()} cannot be reached now "
                           f"({reach.error or 'no answer yet'}); checked again in {wait} s (HF_ENDPOINT may name "
                           "a mirror)"), wait
        if download.state == "failed":
            return True, download.describe(), None
        return True, (f"XTTS v2 is not downloaded yet: the first load fetches {self.model.repo_id} (about 1.9 GB) "
                      f"from {hub_endpoint()} into {hub_cache_dir()} in the background"), None

    def start(self) -> str:
        """Start the download (when it may start) and say where it stands."""
        self.download.start(accept=self.accept or self.accepted())
        return self.download.describe()


class XttsEngine(BaseEngine):
    """Coqui XTTS v2 (or the tiny test checkpoint) from a checkpoint directory or coqui's model manager.

    Args:
        checkpoint: ``TTS_GATEWAY_XTTS_CHECKPOINT``; None uses coqui-tts's model manager and the HF cache.
        accept_licence: ``TTS_GATEWAY_ACCEPT_CPML``: XTTS v2 may be downloaded on first load.
    """

    name = "xtts"
    capabilities = Capabilities(streaming=True, deterministic=False, native_speed=True)
    reference_sample_rate = 22050

    def __init__(self, checkpoint: Path | None, device: str = "auto", threads: int = 0, *,
                 accept_licence: bool = False, hub: HubModel | None = None, max_batch: int = 0,
                 precision: str = "fp32") -> None:
        super().__init__()
        self.max_batch = max_batch or DEFAULT_MAX_BATCH
        self.precision = precision
        self.kernels: dict[str, Any] = {}  # what load() chose and measured
        self._budget = shared_budget()
        self._torch = torch_thread()  # all of its torch work runs there (see `torch_thread` for why)…
        self._narrow = narrow_thread()  # …but decodes beside the GPT's steps, on one core
        self._threads = 1  # torch's intra-op threads when the cores are free (fixed at load)
        self.configured = checkpoint
        self.device_setting = device
        self.threads = threads
        self.hub = hub
        self._hub_error: str | None = None
        if hub is None and checkpoint is None:
            try:
                self.hub = HubModel(accept_licence)
            except Exception as exc:  # coqui-tts's model list unreadable: say so instead of failing the start
                self._hub_error = f"coqui-tts's model list has no usable XTTS v2 entry ({exc})"
        self._active: Path | None = None  # the checkpoint the loaded model came from
        self._model: Any = None
        self._batcher: GptBatcher | None = None
        self._observer: Callable[[int], None] | None = None  # sequences per GPT step (metrics)
        self._lock = threading.Lock()  # load, unload and conditioning one at a time
        self._speakers = SpeakerCache()

    # -- description ---------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path | None:
        """The directory in use: the configured one, the loaded one, or the cached hub snapshot."""
        if self.configured is not None:
            return self.configured
        if self._active is not None:
            return self._active
        return self.hub.checkpoint() if self.hub is not None else None

    @property
    def sample_rate(self) -> int:
        return int(self._config().get("model_args", {}).get("output_sample_rate", 24000))

    @property
    def languages(self) -> list[str]:
        return list(self._config().get("languages") or DEFAULT_LANGUAGES)

    @property
    def model(self) -> ModelInfo:
        checkpoint = self.checkpoint
        if checkpoint is None or not (checkpoint / "model.pth").is_file():
            return ModelInfo(id="xtts_v2", sha256=None, licence=LICENCE)
        if self.configured is None and self.hub is not None:
            model_id = f"xtts_v2/{self.hub.model.repo_id}@{checkpoint.name[:12]}"  # snapshot folder: the commit
        else:
            model_id = f"xtts_v2/{checkpoint.name}"
        return ModelInfo(id=model_id, sha256=file_sha256(checkpoint / "model.pth"), licence=LICENCE)

    def _config(self) -> dict[str, Any]:
        checkpoint = self.checkpoint
        if checkpoint is None:
            return {}
        try:
            data = json.loads((checkpoint / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def availability(self) -> tuple[bool, str | None]:
        if self.configured is None:
            if self._active is not None:
                return True, None
            if self.hub is None:
                return False, (f"{self._hub_error}; set TTS_GATEWAY_XTTS_CHECKPOINT to a directory with "
                               "config.json, model.pth and vocab.json")
            return self.hub.availability()
        if not self.configured.is_dir():
            return False, f"TTS_GATEWAY_XTTS_CHECKPOINT={self.configured} does not exist (or is not a directory)"
        missing = [name for name in REQUIRED_FILES if not (self.configured / name).is_file()]
        if missing:
            return False, f"checkpoint {self.configured} lacks {', '.join(missing)}"
        return True, None

    def observe_batches(self, observer: Callable[[int], None]) -> None:
        self._observer = observer
        if self._batcher is not None:
            self._batcher.observer = observer

    def retry_after(self) -> int | None:
        if self.configured is None and self._active is None and self.hub is not None:
            return self.hub.retry_after_s
        return None

    def voices(self) -> list[BuiltinVoice]:
        """The checkpoint's studio speakers (``speakers_xtts.pth``), read once and cached; each speaks every
        language of the engine, English by default (XTTS v2's speakers were recorded in English)."""
        if not self.availability()[0] and self._active is None:
            return []
        speakers = self._speakers.speakers(self.checkpoint)
        languages = tuple(self.languages)
        own = "en" if "en" in languages else (languages[0] if languages else "")
        return [BuiltinVoice(s.slug, own, f"XTTS v2 studio speaker {s.name}; speaks all {len(languages)} XTTS "
                             "languages", licence=LICENCE, languages=languages) for s in speakers.by_slug.values()]

    def max_chars(self, language: str) -> int:
        return _CHAR_LIMITS.get(language.split("-")[0], 250)

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        ok, reason = self.availability()
        if not ok:
            raise EngineUnavailable(self.name, reason or "unavailable", retry_after=self.retry_after() or 30)
        checkpoint = self.checkpoint
        if checkpoint is None:  # coqui's model manager has not fetched it: do so in the background
            assert self.hub is not None
            reason = self.hub.start()
            self.hub.availability()  # what the start led to (running, or failed at once), for Retry-After
            raise EngineUnavailable(self.name, reason, retry_after=self.retry_after() or DOWNLOAD_POLL_S)
        self._torch.call(lambda: self._load(checkpoint))

    def _load(self, checkpoint: Path) -> None:
        import torch

        from tts_gateway.engines.torch_compat import import_torchaudio

        device = resolve_device(self.device_setting, self.name)  # before any weights are read
        import_torchaudio()
        from TTS.tts.configs.xtts_config import XttsConfig
        from TTS.tts.models.xtts import Xtts

        if self.threads:
            torch.set_num_threads(self.threads)
        self._threads = torch.get_num_threads()
        config = XttsConfig()
        config.load_json(str(checkpoint / "config.json"))
        model = Xtts(config)
        # coqui-tts reads model.pth (and speakers_xtts.pth) with torch.load(weights_only=True).
        model.load_checkpoint(config, checkpoint_dir=str(checkpoint), eval=True)
        model.to(device)
        self._model = model
        stack = GptStack(model.gpt)
        self.kernels = prepare(model.gpt, self.precision, lambda rows: probe_step(stack, rows),
                               batch=min(4, self.max_batch), pack_rows=self.max_batch)
        self.kernels.update(prepare_decoder(model.hifigan_decoder, lambda: _probe_decoder(model)))
        log.info("XTTS's GPT and decoder run on %s",
                 {name: round(value, 2) if isinstance(value, float) else value for name, value in self.kernels.items()})
        self._batcher = GptBatcher(stack, self.max_batch, self._gpt_cores, observer=self._observer,
                                   runner=self._torch)
        self._active = checkpoint
        self._loaded = True

    def unload(self) -> None:
        with self._lock:
            batcher, self._batcher = self._batcher, None
            if batcher is not None:
                batcher.close()  # its sequences fail with "unloaded"
            self._model = None
            self._active = None
            self._loaded = False
        release_memory()

    # -- work ----------------------------------------------------------------------------------
    def compute_latents(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        """Conditioning latents from mono float32 audio at 22.05 kHz (decoded by soundfile)."""
        import torch

        model = self._require_model()
        wav = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None, :]
        config = model.config

        def conditioning() -> tuple[Any, Any]:
            return (model.get_gpt_cond_latents(wav, self.reference_sample_rate,
                                               length=int(getattr(config, "gpt_cond_len", 30)),
                                               chunk_length=int(getattr(config, "gpt_cond_chunk_len", 4))),
                    self._speaker_embedding(model, audio, self.reference_sample_rate))

        with self._lock:
            gpt_cond_latent, speaker_embedding = self._run(conditioning)
        return {
            "gpt_cond_latent": gpt_cond_latent.detach().cpu().numpy().astype(np.float32),
            "speaker_embedding": speaker_embedding.detach().cpu().numpy().astype(np.float32),
        }

    @staticmethod
    def _speaker_embedding(model: Any, audio: np.ndarray, rate: int) -> Any:
        """XTTS's speaker encoder on ``audio`` (mono float32 at ``rate``), resampled to 16 kHz by soxr first
        (so coqui's torchaudio resample is a no-op)."""
        import soxr
        import torch

        wav16 = soxr.resample(np.asarray(audio, dtype=np.float32), rate, 16000).astype(np.float32)
        return model.get_speaker_embedding(torch.from_numpy(wav16)[None, :], 16000)

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Iterator[np.ndarray]:
        """The sentence's GPT tokens are made in the shared batch (`xtts_batching`), its audio chunk by chunk as
        they come (`decode_latents`; see `_decoder_calls` for where) — a seeded whole request's decoded once
        at the end, on the fixed thread count."""
        import torch

        self.check_language(options.language)
        model = self._require_model()
        batcher = self._batcher
        if batcher is None:
            raise EngineUnavailable(self.name, "model is not loaded")
        device = next(model.parameters()).device
        gpt_cond_latent, speaker_embedding = self._conditioning(voice)
        gpt_cond_latent, speaker_embedding = gpt_cond_latent.to(device), speaker_embedding.to(device)
        sequence = self._submit(batcher, gpt_cond_latent, text, options)
        latents = lent_while_seated(sequence, sequence.latents(options.cancel), options.lend, options.cancel)
        chunks: Generator[Any, None, None]
        if options.repeatable and not options.streaming:
            chunks = self._decode_whole(model, latents, speaker_embedding, options)
        else:  # the decoder run incrementally, each frame decoded once (linear cost)
            # A whole answer's chunks are decoded while its later tokens are made: nobody hears the first sooner.
            first = FIRST_CHUNK_TOKENS if options.streaming else CHUNK_TOKENS
            chunks = decode_latents(model, latents, speaker_embedding, speed=options.speed, first_chunk=first,
                                    run=self._decoder_calls(options.repeatable, listener=options.streaming))
            if not options.streaming:
                chunks = _joined(chunks)
        try:
            while True:
                with torch.inference_mode():
                    chunk = next(chunks, None)
                if options.cancel.is_set():
                    raise SynthesisCancelled("cancelled")
                if chunk is None:
                    return
                yield chunk.detach().cpu().numpy().astype(np.float32).reshape(-1)
        finally:
            # Now, not when a traceback holding this frame is collected: a decode may hold the cores, and
            # `latents` the request's lent admission slot.
            chunks.close()
            latents.close()
            sequence.cancel()  # a no-op once it finished; otherwise its row is freed at the next step

    def _decode_whole(self, model: Any, latents: Iterator[Any], speaker_embedding: Any,
                      options: SynthesisOptions) -> Generator[Any, None, None]:
        """One decode of every latent at the end (``inference_stream(stream_chunk_size=0)``'s arithmetic)."""
        import torch
        import torch.nn.functional as F

        collected = list(latents)
        if not collected or options.cancel.is_set():
            return

        def decode() -> Any:
            gpt_latents = torch.cat(collected, dim=0)[None, :]
            length_scale = 1.0 / max(options.speed, 0.05)
            if length_scale != 1.0:
                gpt_latents = F.interpolate(gpt_latents.transpose(1, 2), scale_factor=length_scale,
                                            mode="linear").transpose(1, 2)
            return model.hifigan_decoder(gpt_latents, g=speaker_embedding).squeeze()

        # The cores are released before the yield: a consumer that stops must not keep them.
        yield self._run(decode)

    def _submit(self, batcher: GptBatcher, gpt_cond_latent: Any, text: str, options: SynthesisOptions) -> Sequence:
        """The sentence's sequence, queued in the batch by the call that makes its prompt (see `_prompt`): the
        prompts of requests that come together are then all queued before the batcher's next round, and run
        in it together (queued by the request's thread, the first would be queued alone while the others'
        calls wait behind the round that seats it)."""

        def queued(prompt: Any) -> Sequence:
            sequence = Sequence(prompt=prompt, seed=options.seed or 0, repeatable=options.repeatable,
                                prefix=int(gpt_cond_latent.shape[1]))
            batcher.submit(sequence)
            return sequence

        return self._prompt(batcher, gpt_cond_latent, text, options.language, then=queued)

    def _prompt(self, batcher: GptBatcher, gpt_cond_latent: Any, text: str, language: str,
                then: Callable[[Any], Any] = lambda prompt: prompt) -> Any:
        """``then(prompt)``, the prompt's embeddings made in a short call on the torch thread, ahead of the
        queue (a request waits); ``then`` runs in the same call."""
        import torch

        tokens = text_tokens(self._require_model(), text, language)

        def embed() -> Any:
            with torch.inference_mode():
                prompt = batcher.stack.prompt(gpt_cond_latent, tokens)
            return then(prompt)

        return self._torch.call(embed, urgent=True)

    def trace(self, text: str, language: str, voice: VoiceInput, seed: int) -> dict[str, Any]:
        """One seeded sentence, alone, with what a precision comparison needs: its audio tokens, the first
        step's logits (a pass of their own, not timed), the audio (numpy) and the wall time of the sentence."""
        import time

        model = self._require_model()
        batcher = self._batcher
        assert batcher is not None
        gpt_cond_latent, speaker_embedding = self._conditioning(voice)
        prompt = self._prompt(batcher, gpt_cond_latent, text, language)

        def first_logits() -> Any:  # `_run` holds inference mode
            cache = batcher.stack.cache(1)
            cache.add_row()
            return batcher.stack.logits(batcher.stack.forward(prompt, cache, [0]))[0].cpu().numpy()

        logits = self._run(first_logits)
        started = time.perf_counter()
        sequence = Sequence(prompt=prompt, seed=seed, repeatable=True, prefix=int(gpt_cond_latent.shape[1]))
        batcher.submit(sequence)
        options = SynthesisOptions(language=language, seed=seed, repeatable=True)
        audio = next(self._decode_whole(model, sequence.latents(), speaker_embedding, options))
        return {"tokens": list(sequence.tokens), "logits": logits, "audio": audio.cpu().numpy(),
                "seconds": time.perf_counter() - started}

    def speaker_embedding(self, audio: np.ndarray) -> np.ndarray:
        """XTTS's speaker encoder's embedding of audio at the output rate (for comparing two outputs)."""
        model = self._require_model()
        embedding = self._run(lambda: self._speaker_embedding(model, audio, self.sample_rate))
        return np.asarray(embedding.detach().cpu().numpy(), dtype=np.float32).reshape(-1)

    def _conditioning(self, voice: VoiceInput) -> tuple[Any, Any]:
        """(gpt_cond_latent, speaker_embedding) tensors of a preset, an upload or a studio speaker."""
        import torch

        if voice.latents is not None:
            return (torch.from_numpy(np.asarray(voice.latents["gpt_cond_latent"], dtype=np.float32)),
                    torch.from_numpy(np.asarray(voice.latents["speaker_embedding"], dtype=np.float32)))
        if voice.builtin is not None:
            speaker = self._speakers.speakers(self._active).get(voice.builtin)
            if speaker is None:
                raise NotFound(f"unknown voice 'xtts:{voice.builtin[:64]}': the checkpoint has no such studio speaker "
                               f"({SPEAKERS_FILE})", code="unknown-voice")
            return speaker.gpt_cond_latent, speaker.speaker_embedding
        raise EngineUnavailable(self.name, "XTTS needs a voice: a studio speaker (xtts:NAME), a preset or reference "
                                           "audio")

    @contextmanager
    def _cores(self, threads: int | None, urgent: bool = False) -> Iterator[int]:
        """A slot in the process's core budget, torch's intra-op threads on the calling thread set to it.
        ``threads``: exactly so many (the engine's count for a seeded request: its bytes must not depend on
        the load); None: every core when the machine is free, one beside other calls. On a GPU the cores stay
        free."""
        import torch

        if next(self._require_model().parameters()).device.type != "cpu":
            yield 0
            return
        with self._budget.slot(threads=threads, urgent=urgent) as granted:
            granted = min(granted, self._threads)
            if torch.get_num_threads() != granted:  # per thread (OpenMP's and MKL's settings are thread-local)
                torch.set_num_threads(granted)
            yield granted

    def _gpt_cores(self, repeatable: bool) -> AbstractContextManager[int]:
        """The batcher's slot for a GPT step or prompt: a seeded sequence's on the fixed thread count."""
        return self._cores(self._threads if repeatable else None)

    def _run(self, fn: Callable[[], Any], urgent: bool = False, wide: bool = False, beside: bool = False) -> Any:
        """``fn()`` on the torch thread, in inference mode, holding a slot of the core budget while it runs: on
        the engine's fixed thread count, or ``wide`` (every free core, see `_cores`); ``beside``: on the narrow
        thread instead, on one core."""
        import torch

        threads = 1 if beside else None if wide else self._threads

        def held() -> Any:
            with self._cores(threads, urgent=urgent), torch.inference_mode():
                return fn()

        return (self._narrow if beside else self._torch).call(held, urgent=urgent)

    def _decoder_calls(self, repeatable: bool, listener: bool) -> Callable[[Callable[[], Any], bool], Any]:
        """Where a request's decoder calls run (`decode_latents`'s ``run``). A seeded request's: on the torch
        thread at the fixed thread count. Otherwise, while unseeded sentences have GPT steps to come: on the
        narrow thread, one core, beside the steps (which then take the other core); a listener's first
        audio excepted (on the torch thread, ahead of the steps: it is short and someone waits). Else on
        the torch thread with every free core (a lone sentence's last chunk)."""

        def run(fn: Callable[[], Any], urgent: bool) -> Any:
            if repeatable:
                return self._run(fn, urgent)
            urgent = urgent and listener
            batcher = self._batcher
            if urgent or batcher is None or not batcher.stepping():
                return self._run(fn, urgent, wide=True)
            return self._run(fn, beside=True)

        return run

    def _require_model(self) -> Any:
        model = self._model
        if model is None:
            raise EngineUnavailable(self.name, "model is not loaded")
        return model


def _probe_decoder(model: Any, tokens: int = 24) -> None:
    """One decode of ``tokens`` latents (a streamed chunk's worth), to measure the decoder's kernels."""
    import torch

    decoder = model.hifigan_decoder
    latents = torch.zeros(1, tokens, model.gpt.gpt.config.n_embd, device=next(decoder.parameters()).device)
    generator = decoder.waveform_decoder
    cond = getattr(generator, "cond_layer", None)
    g = None if cond is None else torch.ones(1, cond.in_channels, 1, device=latents.device)
    decoder(latents, g=g)


def _joined(chunks: Generator[Any, None, None]) -> Generator[Any, None, None]:
    """The chunks as one (a whole answer is one piece of audio)."""
    import torch

    with closing(chunks):
        parts = list(chunks)
    if parts:
        yield torch.cat(parts)


@hookimpl(trylast=True)
def register_engines(register: Callable[[Any], None], context: EngineContext) -> None:
    register(XttsEngine(context.options.get("xtts_checkpoint"), device=context.device, threads=context.threads,
                        accept_licence=bool(context.options.get("accept_cpml")),
                        max_batch=int(context.options.get("xtts_max_batch") or 0),
                        precision=str(context.options.get("xtts_precision") or "fp32")))
