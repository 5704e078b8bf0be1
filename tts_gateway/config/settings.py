"""`TTS_GATEWAY_*` environment variables parsed into one immutable `Settings` object.

Settings are read once (``Settings.from_env()``) and handed to whatever needs them; nothing
reads the environment later, so tests build their own ``Settings`` freely.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tts_gateway.errors import Invalid

PREFIX = "TTS_GATEWAY_"
# TTS_GATEWAY_ENGINE_<NAME>_<KEY>: an engine's own option (engines read theirs with EngineContext.options_for).
ENGINE_OPTION_PREFIX = PREFIX + "ENGINE_"
_ENGINE_OPTION_RE = re.compile(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+")
SCOPES = frozenset({"synthesize", "voices", "admin"})
# A voice setting is a preset name or engine:voice; the voices layer checks that it exists.
_VOICE_SETTING_RE = re.compile(r"^(?:[a-z0-9_-]{1,40}:)?[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
DEFAULT_OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer")


class SettingsError(Invalid):
    """A setting has a bad value; the message names the variable."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, code="bad-setting")


@dataclass(frozen=True)
class ApiKey:
    key: str
    scopes: frozenset[str]

    def __repr__(self) -> str:  # keys must never reach logs
        return f"ApiKey(scopes={sorted(self.scopes)})"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8001
    data_dir: Path = field(default_factory=lambda: Path.home() / ".local" / "share" / "tts-gateway")
    engines: tuple[str, ...] = ("piper", "xtts", "espeak", "kokoro")  # kokoro costs nothing until used
    plugins: tuple[str, ...] = ()
    default_voice: str = "piper:joe"
    xtts_checkpoint: Path | None = None
    device: str = "auto"
    api_keys: tuple[ApiKey, ...] = ()
    max_text_chars: int = 5000
    max_upload_bytes: int = 20_000_000  # 20 MB
    header_timeout_s: float = 10.0  # a request line and headers arrive within this, or 408
    body_timeout_s: float = 30.0  # longest pause inside a request body before the connection closes
    max_concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_queue: int = 16
    timeout_s: float = 120.0
    engine_idle_ttl_s: float = 0.0  # 0 keeps engines loaded forever
    cache_bytes: int = 1_000_000_000  # 1 GB
    openai_voice_map: Mapping[str, str] = field(default_factory=dict)
    canary: bool = True  # /ready runs one short synthesis on the default voice
    engine_threads: int = 0  # 0 = leave torch/onnxruntime defaults
    # postgresql://… makes PostgreSQL the voice registry shared by every node; None keeps the local one.
    # Not in repr: the URL may hold a password.
    registry_url: str | None = field(default=None, repr=False)
    # TTS_GATEWAY_BACKEND=ray runs synthesis on Ray Serve replicas (pip install '.[ray]'); docs/scaling.md
    backend: str = "local"
    ray_address: str = ""  # empty: start a local cluster
    ray_replicas: int = 1
    ray_max_ongoing_requests: int = 2
    ray_max_queued_requests: int = 16  # Serve 2.60 accepts >= 1
    ray_replica_cpus: float = 0.0  # 0: each replica gets an even share of the free CPUs, at most 1
    ray_num_cpus: int = 0  # CPUs of a local cluster started here; 0: all of this machine's
    ray_start_timeout_s: float = 600.0  # a deployment not running by then stops start-up with the reason
    # Per engine, from TTS_GATEWAY_RAY_<ENGINE>_CPUS / _GPUS: {"xtts": {"num_gpus": 1.0}, …}
    ray_placement: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # Serve autoscaling when ray_max_replicas > 0 (replicas between min and max, aiming at the target).
    ray_min_replicas: int = 1
    ray_max_replicas: int = 0
    ray_target_ongoing_requests: float = 2.0
    # tcp://HOST:PORT: also serve the Wyoming protocol (Home Assistant); None keeps it off.
    wyoming_uri: str | None = None
    require_consent: bool = True  # registering a clone needs consent=true (the speaker agreed)
    accept_cpml: bool = False  # the user accepts the Coqui Public Model License (XTTS v2 may be fetched)
    xtts_max_batch: int = 0  # most XTTS sequences decoded together (0: the engine's choice)
    xtts_precision: str = "fp32"  # int8: dynamic int8 quantization of XTTS's GPT (opt-in)
    kokoro_model: Path | None = None  # a kokoro-v1.0 ONNX model …
    kokoro_voices: Path | None = None  # … and its voices file (kokoro-onnx)
    piper_voices_dir: Path | None = None  # every NAME.onnx + NAME.onnx.json here is a voice piper:NAME
    # Plugin engines' options, by <NAME>_<KEY> in capitals (TTS_GATEWAY_ENGINE_HELLO_GREETING → "HELLO_GREETING").
    engine_options: Mapping[str, str] = field(default_factory=dict)
    # TTS_GATEWAY_* variables that mean nothing here, each with the nearest known name (start-up warns).
    unknown_variables: tuple[tuple[str, str | None], ...] = field(default=(), compare=False)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def openai_voice(self, name: str) -> str | None:
        """Built-in voice an OpenAI voice name maps to, or None when it is not an OpenAI name."""
        if name in self.openai_voice_map:
            return self.openai_voice_map[name]
        if name in DEFAULT_OPENAI_VOICES:
            return self.default_voice
        return None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse and validate every setting; raise `SettingsError` naming the bad variable."""
        source = os.environ if environ is None else environ
        env = _Recording(source)
        base = cls()

        def raw(name: str) -> str | None:
            value = env.get(PREFIX + name)
            return None if value is None or value.strip() == "" else value.strip()

        def integer(name: str, default: int, lo: int, hi: int | None = None) -> int:
            value = raw(name)
            if value is None:
                return default
            try:
                parsed = int(value)
            except ValueError:
                raise SettingsError(f"{PREFIX}{name} must be an integer, got {value!r}") from None
            if parsed < lo or (hi is not None and parsed > hi):
                bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                raise SettingsError(f"{PREFIX}{name} must be {bound}, got {parsed}")
            return parsed

        def number(name: str, default: float, lo: float) -> float:
            value = raw(name)
            if value is None:
                return default
            try:
                parsed = float(value)
            except ValueError:
                raise SettingsError(f"{PREFIX}{name} must be a number, got {value!r}") from None
            if not parsed >= lo or parsed == float("inf"):
                raise SettingsError(f"{PREFIX}{name} must be a finite number >= {lo}, got {value}")
            return parsed

        def names(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
            value = env.get(PREFIX + name)
            if value is None:
                return default
            return tuple(part.strip() for part in value.split(",") if part.strip())

        def flag(name: str, default: bool) -> bool:
            value = raw(name)
            if value is None:
                return default
            lowered = value.lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise SettingsError(f"{PREFIX}{name} must be 1 or 0 (true/false), got {value!r}")

        def path(name: str) -> Path | None:
            value = raw(name)
            return Path(value).expanduser() if value else None

        device = (raw("DEVICE") or "auto").lower()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise SettingsError(f"{PREFIX}DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}")

        checkpoint = raw("XTTS_CHECKPOINT")
        default_voice = raw("DEFAULT_VOICE") or base.default_voice
        if not _VOICE_SETTING_RE.fullmatch(default_voice):
            raise SettingsError(f"{PREFIX}DEFAULT_VOICE is not a valid voice name: {default_voice!r}")

        engines = names("ENGINES", base.engines)
        for engine in engines:
            if not re.fullmatch(r"[a-z0-9_-]+", engine):
                raise SettingsError(f"{PREFIX}ENGINES has a bad engine name: {engine!r}")
        plugins = names("PLUGINS", ())
        for plugin in plugins:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", plugin):
                raise SettingsError(f"{PREFIX}PLUGINS has a bad module name: {plugin!r}")

        placement: dict[str, dict[str, float]] = {}
        for engine in engines:
            for kind, key in (("CPUS", "num_cpus"), ("GPUS", "num_gpus")):
                variable = f"RAY_{engine.upper().replace('-', '_')}_{kind}"
                if raw(variable) is not None:
                    placement.setdefault(engine, {})[key] = number(variable, 0.0, 0.0)

        precision = (raw("XTTS_PRECISION") or base.xtts_precision).lower()
        if precision not in ("fp32", "int8"):
            raise SettingsError(f"{PREFIX}XTTS_PRECISION must be fp32 or int8, got {precision!r}")

        backend = (raw("BACKEND") or "local").lower()
        if backend not in ("local", "ray"):
            raise SettingsError(f"{PREFIX}BACKEND must be local or ray, got {backend!r}")
        registry_url = raw("REGISTRY_URL")
        if registry_url is not None and not registry_url.startswith(("postgresql://", "postgres://")):
            scheme = registry_url.partition("://")[0] if "://" in registry_url else registry_url[:12]
            raise SettingsError(f"{PREFIX}REGISTRY_URL must start with postgresql:// or postgres://, "
                                f"got {scheme!r}…")

        parsed = cls(
            host=raw("HOST") or base.host,
            port=integer("PORT", base.port, 0, 65535),
            data_dir=Path(raw("DATA_DIR") or base.data_dir).expanduser(),
            engines=engines,
            plugins=plugins,
            default_voice=default_voice,
            xtts_checkpoint=Path(checkpoint).expanduser() if checkpoint else None,
            device=device,
            api_keys=parse_api_keys(raw("API_KEYS")),
            max_text_chars=integer("MAX_TEXT_CHARS", base.max_text_chars, 1),
            max_upload_bytes=parse_size("MAX_UPLOAD_BYTES", raw("MAX_UPLOAD_BYTES"), base.max_upload_bytes),
            header_timeout_s=number("HEADER_TIMEOUT_S", base.header_timeout_s, 0.001),
            body_timeout_s=number("BODY_TIMEOUT_S", base.body_timeout_s, 0.001),
            max_concurrency=integer("MAX_CONCURRENCY", base.max_concurrency, 1),
            max_queue=integer("MAX_QUEUE", base.max_queue, 0),
            timeout_s=number("TIMEOUT_S", base.timeout_s, 0.001),
            engine_idle_ttl_s=number("ENGINE_IDLE_TTL_S", base.engine_idle_ttl_s, 0.0),
            cache_bytes=parse_size("CACHE_BYTES", raw("CACHE_BYTES"), base.cache_bytes),
            openai_voice_map=parse_voice_map(raw("OPENAI_VOICES")),
            canary=(raw("CANARY") or "1").lower() not in {"0", "false", "no", "off"},
            engine_threads=integer("ENGINE_THREADS", base.engine_threads, 0, 256),
            registry_url=registry_url,
            backend=backend,
            ray_address=raw("RAY_ADDRESS") or "",
            ray_replicas=integer("RAY_REPLICAS", base.ray_replicas, 1),
            ray_max_ongoing_requests=integer("RAY_MAX_ONGOING_REQUESTS", base.ray_max_ongoing_requests, 1),
            ray_max_queued_requests=integer("RAY_MAX_QUEUED_REQUESTS", base.ray_max_queued_requests, 1),
            ray_replica_cpus=number("RAY_REPLICA_CPUS", base.ray_replica_cpus, 0.0),
            ray_num_cpus=integer("RAY_NUM_CPUS", base.ray_num_cpus, 0),
            ray_start_timeout_s=number("RAY_START_TIMEOUT_S", base.ray_start_timeout_s, 1.0),
            ray_placement=placement,
            ray_min_replicas=integer("RAY_MIN_REPLICAS", base.ray_min_replicas, 0),
            ray_max_replicas=integer("RAY_MAX_REPLICAS", base.ray_max_replicas, 0),
            ray_target_ongoing_requests=number("RAY_TARGET_ONGOING_REQUESTS", base.ray_target_ongoing_requests, 0.01),
            wyoming_uri=parse_wyoming_uri(raw("WYOMING_URI")),
            accept_cpml=flag("ACCEPT_CPML", False),
            xtts_max_batch=integer("XTTS_MAX_BATCH", base.xtts_max_batch, 0),
            xtts_precision=precision,
            require_consent=flag("REQUIRE_CONSENT", True),
            kokoro_model=path("KOKORO_MODEL"),
            kokoro_voices=path("KOKORO_VOICES"),
            piper_voices_dir=path("PIPER_VOICES_DIR"),
        )
        if 0 < parsed.ray_max_replicas < parsed.ray_min_replicas:
            raise SettingsError(f"{PREFIX}RAY_MAX_REPLICAS ({parsed.ray_max_replicas}) must be at least "
                                f"{PREFIX}RAY_MIN_REPLICAS ({parsed.ray_min_replicas})")
        # Last, so that settings of their own that start the same way (ENGINE_THREADS) are taken already.
        engine_options = {}
        for variable in sorted(source):
            suffix = variable.removeprefix(ENGINE_OPTION_PREFIX)
            if variable.startswith(ENGINE_OPTION_PREFIX) and variable not in env.asked \
                    and _ENGINE_OPTION_RE.fullmatch(suffix) and (value := raw(variable.removeprefix(PREFIX))):
                engine_options[suffix.upper()] = value
        return replace(parsed, engine_options=engine_options, unknown_variables=env.unknown())


class _Recording(Mapping[str, str]):
    """The environment, remembering which TTS_GATEWAY_* names were asked for."""

    def __init__(self, source: Mapping[str, str]) -> None:
        self.source = source
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self.source[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return self.source.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)

    def unknown(self) -> tuple[tuple[str, str | None], ...]:
        known = sorted(k.removeprefix(PREFIX) for k in self.asked if k.startswith(PREFIX))
        found = []
        for name in sorted(k for k in self.source if k.startswith(PREFIX) and k not in self.asked):
            close = difflib.get_close_matches(name.removeprefix(PREFIX), known, n=1, cutoff=0.6)
            found.append((name, PREFIX + close[0] if close else None))
        return tuple(found)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(name: str, value: str | None, default: int) -> int:
    """Parse ``20MB``, ``512KiB`` or a plain byte count."""
    if value is None:
        return default
    match = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise SettingsError(f"{PREFIX}{name} must be a byte size such as 20MB or 1048576, got {value!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_api_keys(value: str | None) -> tuple[ApiKey, ...]:
    """Parse ``key1:admin,key2:synthesize+voices``; admin implies every scope."""
    if value is None:
        return ()
    keys: list[ApiKey] = []
    for index, item in enumerate(part.strip() for part in value.split(",")):
        if not item:
            continue
        key, sep, scope_text = item.rpartition(":")
        if not sep or not key:
            raise SettingsError(f"{PREFIX}API_KEYS entry {index + 1} must look like KEY:SCOPE[+SCOPE]")
        scopes = frozenset(s.strip() for s in scope_text.split("+") if s.strip())
        unknown = scopes - SCOPES
        if not scopes or unknown:
            raise SettingsError(
                f"{PREFIX}API_KEYS entry {index + 1} has unknown scope(s) {sorted(unknown) or '(none)'}; "
                f"use {', '.join(sorted(SCOPES))}"
            )
        if "admin" in scopes:
            scopes = SCOPES
        keys.append(ApiKey(key=key, scopes=scopes))
    return tuple(keys)


def parse_wyoming_uri(value: str | None) -> str | None:
    """``tcp://HOST:PORT`` (the Wyoming server's address), or None when unset."""
    if value is None:
        return None
    match = re.fullmatch(r"tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})", value)
    if not match or not 0 < int(match.group(2)) <= 65535:
        raise SettingsError(f"{PREFIX}WYOMING_URI must look like tcp://127.0.0.1:10200, got {value[:80]!r}")
    return value


def parse_voice_map(value: str | None) -> dict[str, str]:
    """Parse ``alloy=piper:joe,echo=espeak:en`` (OpenAI voice name → gateway voice)."""
    if value is None:
        return {}
    mapping: dict[str, str] = {}
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise SettingsError(f"{PREFIX}OPENAI_VOICES entries must look like alloy=piper:joe, got {item!r}")
        mapping[source.strip()] = target.strip()
    return mapping
