"""The gateway's engines in ray mode: stand-ins that hold no model and know only what replicas say.

A `RemoteEngine` answers the engine protocol from the `ClusterView` (the description its replicas
report), so voices, planning, ``/v1/engines`` and ``/v1/languages`` work unchanged on a gateway node
that has neither torch nor onnxruntime. What needs the model runs on a replica: conditioning
(``compute_latents``), blending, and load/unload, which become orders to every replica. A stand-in
asks all of that of a `ReplicaBackend` (the `RayBackend` is one), not of the backend's module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from tts_gateway.engines.base import (
    BlendingEngine,
    BuiltinVoice,
    Capabilities,
    CloningEngine,
    ModelInfo,
    SynthesisOptions,
    VoiceInput,
)
from tts_gateway.engines.hookspecs import hookimpl
from tts_gateway.engines.timing import SENTENCE

DEFAULT_MAX_CHARS = 400


class ReplicaBackend(Protocol):
    """What a stand-in asks of the backend that reaches its engine's replicas (worker threads only)."""

    def description(self, engine: str) -> dict[str, Any] | None:
        """The engine's description as its replicas last reported it; None before the first report."""
        ...

    def live_replicas(self, engine: str) -> list[dict[str, Any]]:
        """Each live replica's state, as on the board."""
        ...

    def missing_replicas(self, engine: str) -> str | None:
        """Why the engine has no live replica, or None when it has one."""
        ...

    def order(self, engine: str, action: str) -> None:
        """Have every live replica ``load`` or ``unload`` the model, and wait until each has."""
        ...

    def condition(self, engine: str, audio: Any, rate: int) -> dict[str, Any]:
        """Latents computed by a replica for float32 mono ``audio`` at ``rate``."""
        ...

    def blend(self, engine: str, weights: Mapping[str, float]) -> dict[str, Any]:
        """A blended voice's latents computed by a replica."""
        ...


class RemoteEngine:
    """An engine whose model lives on Ray Serve replicas; see the module docstring."""

    remote = True  # EngineManager leaves it alone at close and in the idle reaper: replicas own their models

    def __init__(self, name: str, backend: ReplicaBackend) -> None:
        self.name = name
        self._backend = backend

    def _described(self) -> dict[str, Any]:
        return self._backend.description(self.name) or {}

    @property
    def capabilities(self) -> Capabilities:
        known = set(Capabilities.__dataclass_fields__)
        return Capabilities(**{k: v for k, v in (self._described().get("capabilities") or {}).items() if k in known})

    @property
    def sample_rate(self) -> int:
        return int(self._described().get("sample_rate") or 16000)

    @property
    def languages(self) -> list[str]:
        return list(self._described().get("languages") or [])

    @property
    def language_names(self) -> dict[str, str]:
        return dict(self._described().get("language_names") or {})

    @property
    def model(self) -> ModelInfo:
        model = self._described().get("model")
        if not model:
            return ModelInfo(id=self.name)
        return ModelInfo(id=str(model["id"]), sha256=model.get("sha256"), licence=str(model.get("licence", "unknown")))

    @property
    def loaded(self) -> bool:
        return any(replica.get("loaded") for replica in self._backend.live_replicas(self.name))

    def replicas(self) -> list[dict[str, Any]]:
        """Each live replica's state (``/v1/engines`` shows them)."""
        from tts_gateway.ray.board import replica_values

        return [replica_values(state) for state in self._backend.live_replicas(self.name)]

    def availability(self) -> tuple[bool, str | None]:
        missing = self._backend.missing_replicas(self.name)
        if missing:
            return False, missing
        described = self._described()
        return bool(described.get("available")), described.get("reason")

    def voices(self) -> list[BuiltinVoice]:
        return [BuiltinVoice(id=str(v["id"]), language=str(v.get("language", "")),
                             description=str(v.get("description", "")), licence=str(v.get("licence", "unknown")),
                             languages=tuple(v.get("languages") or ()))
                for v in self._described().get("voices") or []]

    @property
    def timestamp_levels(self) -> tuple[str, ...]:
        """The timestamp levels the engine gives on its replicas (`base.timestamp_levels` asks)."""
        return tuple(self._described().get("timestamps") or (SENTENCE,))

    def max_chars(self, language: str) -> int:
        return int((self._described().get("max_chars") or {}).get(language, DEFAULT_MAX_CHARS))

    def load(self) -> None:
        self._backend.order(self.name, "load")

    def unload(self) -> None:
        self._backend.order(self.name, "unload")

    def synthesize(self, text: str, voice: VoiceInput, options: SynthesisOptions) -> Any:
        raise RuntimeError(f"engine {self.name!r} runs on Ray Serve replicas, not in the gateway process")


class RemoteCloningEngine(RemoteEngine):
    @property
    def reference_sample_rate(self) -> int:
        return int(self._described().get("reference_sample_rate") or 16000)

    def compute_latents(self, audio: np.ndarray) -> dict[str, np.ndarray]:
        return self._backend.condition(self.name, audio, self.reference_sample_rate)


class RemoteBlendingEngine(RemoteEngine):
    def blend_latents(self, weights: dict[str, float]) -> dict[str, np.ndarray]:
        return self._backend.blend(self.name, weights)


class RemoteCloningBlendingEngine(RemoteCloningEngine, RemoteBlendingEngine):
    pass


def remote_engine(local: Any, backend: ReplicaBackend) -> RemoteEngine:
    """The stand-in for an engine of the same kind (cloning, blending) as the local object ``local``."""
    cloning, blending = isinstance(local, CloningEngine), isinstance(local, BlendingEngine)
    kind: type[RemoteEngine] = (RemoteCloningBlendingEngine if cloning and blending else RemoteCloningEngine
                                if cloning else RemoteBlendingEngine if blending else RemoteEngine)
    return kind(local.name, backend)


class RemotePlugin:
    """Registers the stand-ins with an `EngineManager` of their own (no built-in plugin modules)."""

    def __init__(self, engines: list[RemoteEngine]) -> None:
        self.engines = engines

    @hookimpl
    def register_engines(self, register: Any, context: Any) -> None:
        for engine in self.engines:
            register(engine)
