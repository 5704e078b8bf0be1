"""Getting XTTS v2: coqui-tts's own model manager, the Hugging Face cache and the model's licence.

With no ``TTS_GATEWAY_XTTS_CHECKPOINT`` the XTTS engine uses the model coqui-tts's ``ModelManager``
keeps for ``tts_models/multilingual/multi-dataset/xtts_v2``: repository ``tts-hub/XTTS-v2`` in the
Hugging Face cache, fetched by ``huggingface_hub.snapshot_download`` (so ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` work as usual). The repository and its file patterns come
from coqui-tts's own model list, never from a copy here.

The model is under the Coqui Public Model License. coqui asks for acceptance with an ``input()``
prompt unless ``COQUI_TOS_AGREED=1`` is set or a ``tos_agreed.txt`` exists in its model folder; the
gateway never prompts. Accepted means ``TTS_GATEWAY_ACCEPT_CPML=1``, ``tts-gateway models pull xtts
--accept-license`` (which writes coqui's ``tos_agreed.txt``, so later runs count as accepted), or
coqui's own two marks.

A download runs in a child process (``python -m tts_gateway.engines.xtts_models fetch NAME``) that a
daemon thread watches: the server never blocks, the download can be stopped (huggingface_hub's worker
threads cannot be interrupted, and the interpreter waits for them at exit), and the licence flag reaches
coqui only inside that child. Progress is read from the cache on disk. huggingface_hub writes each file
under a temporary name and renames it into place when its size checks out, and
``snapshot_download(local_files_only=True)`` refuses a snapshot its cached file listing shows
incomplete, so a partial download is never loaded.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

XTTS_V2 = "tts_models/multilingual/multi-dataset/xtts_v2"
REQUIRED_FILES = ("config.json", "model.pth", "vocab.json")
CPML_URL = "https://tts-hub.github.io/cpml"  # as coqui-tts's own LICENSE_URLS
# What coqui's ModelManager.ask_tos writes when a user answers "y".
TOS_TEXT = "I have read, understood and agreed to the Terms and Conditions."
PULL_COMMAND = "tts-gateway models pull xtts --accept-license"
# A temporary download file nobody has written to for this long belongs to a dead process.
STALE_PARTIAL_S = 600.0
EXIT_LICENCE = 3


class LicenceNotAccepted(RuntimeError):
    """The model's licence must be accepted before it is downloaded."""


@dataclass(frozen=True)
class CoquiModel:
    """One entry of coqui-tts's model list (``TTS/.models.json``)."""

    name: str
    repo_id: str
    allow: tuple[str, ...] | None
    ignore: tuple[str, ...] | None
    tos_required: bool
    licence: str
    description: str

    @property
    def folder(self) -> Path:
        """coqui's own folder for this model (``tos_agreed.txt`` lives there)."""
        return coqui_data_dir() / self.name.replace("/", "--")

    @property
    def tos_file(self) -> Path:
        return self.folder / "tos_agreed.txt"

    @property
    def allow_patterns(self) -> list[str] | None:
        return list(self.allow) if self.allow else None

    @property
    def ignore_patterns(self) -> list[str] | None:
        return list(self.ignore) if self.ignore else None


def coqui_model(name: str = XTTS_V2) -> CoquiModel:
    """The model's entry in coqui-tts's list, read without importing coqui-tts (its import loads torch)."""
    spec = importlib.util.find_spec("TTS")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RuntimeError("coqui-tts is not installed")  # pragma: no cover - a dependency of the gateway
    catalogue = json.loads((Path(locations[0]) / ".models.json").read_text(encoding="utf-8"))
    kind, language, dataset, model = name.split("/")
    item: dict[str, Any] = catalogue[kind][language][dataset][model]
    if "repo_id" not in item:
        raise ValueError(f"coqui-tts model {name} is not a Hugging Face model")
    return CoquiModel(
        name=name, repo_id=str(item["repo_id"]),
        allow=tuple(item["allow"]) if item.get("allow") else None,
        ignore=tuple(item["ignore"]) if item.get("ignore") else None,
        tos_required=bool(item.get("tos_required")), licence=str(item.get("license", "unknown")),
        description=str(item.get("description", "")),
    )


def coqui_data_dir() -> Path:
    """Where coqui-tts keeps its models: ``trainer.io.get_user_data_dir("tts")``, without importing trainer
    (which loads torch). ``TTS_HOME``, then ``XDG_DATA_HOME``, then the platform's data folder."""
    if "TTS_HOME" in os.environ:
        base = Path(os.environ["TTS_HOME"]).expanduser().resolve(strict=False)
    elif "XDG_DATA_HOME" in os.environ:
        base = Path(os.environ["XDG_DATA_HOME"]).expanduser().resolve(strict=False)
    elif sys.platform == "win32":  # pragma: no cover
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")).resolve(strict=False)
    elif sys.platform == "darwin":  # pragma: no cover
        base = Path("~/Library/Application Support/").expanduser()
    else:
        base = Path.home().joinpath(".local/share")
    return base / "tts"


def licence_accepted(model: CoquiModel, setting: bool) -> bool:
    """The user accepted the licence: the gateway's setting, or either of coqui's own marks."""
    return (not model.tos_required or setting or os.environ.get("COQUI_TOS_AGREED") == "1"
            or model.tos_file.is_file())


def record_acceptance(model: CoquiModel) -> Path:
    """Write coqui's ``tos_agreed.txt`` (what its prompt writes on "y"), so later runs count as accepted."""
    model.folder.mkdir(parents=True, exist_ok=True)
    model.tos_file.write_text(TOS_TEXT, encoding="utf-8")
    return model.tos_file


# -- the Hugging Face cache ---------------------------------------------------------------------------
def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def repo_storage(model: CoquiModel) -> Path:
    return hub_cache_dir() / ("models--" + model.repo_id.replace("/", "--"))


def cached_checkpoint(model: CoquiModel) -> Path | None:
    """The complete cached snapshot (what ``ModelManager.download_model`` would return offline), or None.

    Reads the disk only: ``snapshot_download(local_files_only=True)`` with coqui's patterns, which refuses
    a snapshot whose cached file listing shows missing files; the files the engine loads must be there too.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model.repo_id, local_files_only=True, allow_patterns=model.allow_patterns,
                                        ignore_patterns=model.ignore_patterns))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return None
    return folder


@dataclass(frozen=True)
class Progress:
    done: int
    total: int | None  # None until the file listing is known

    def describe(self) -> str:
        if self.total is None:
            return f"{human_bytes(self.done)} so far" if self.done else "listing files"
        return f"{human_bytes(self.done)} of {human_bytes(self.total)}"


def human_bytes(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{int(count)} B"


def download_progress(model: CoquiModel, since: float = 0.0) -> Progress:
    """Bytes of the model in the cache: finished files of the snapshot being fetched, plus the temporary files
    written since ``since`` (a time.time()). The total comes from the file listing the download caches first."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.utils import filter_repo_objects

    storage = repo_storage(model)
    partial = 0
    for path in (storage / "blobs").glob("*.incomplete"):
        try:
            stat = path.stat()
        except OSError:
            continue
        if stat.st_mtime >= since:
            partial += stat.st_size
    try:
        files = get_cached_repo_tree(model.repo_id)
        commit = (storage / "refs" / "main").read_text().strip()
    except Exception:  # no listing cached yet (CachedRepoTreeNotFoundError), or a half-written cache
        return Progress(partial, None)
    sizes = {f.path: int(f.size or 0) for f in files}
    wanted = list(filter_repo_objects(sizes, allow_patterns=model.allow_patterns,
                                      ignore_patterns=model.ignore_patterns))
    snapshot = storage / "snapshots" / commit
    done = sum(sizes[name] for name in wanted if (snapshot / name).exists())
    return Progress(done + partial, sum(sizes[name] for name in wanted))


def remove_stale_partials(model: CoquiModel, older_than_s: float = STALE_PARTIAL_S) -> int:
    """Delete temporary download files a killed process left behind (huggingface_hub never reuses them: each
    download writes a uniquely named one); a file written to recently may belong to a live download."""
    removed = 0
    cutoff = time.time() - older_than_s
    for path in (repo_storage(model) / "blobs").glob("*.incomplete"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


# -- fetching (in the child process) ----------------------------------------------------------------------
def fetch(model: CoquiModel, *, accept: bool) -> Path:
    """Download through coqui-tts's ``ModelManager.download_model`` and return the checkpoint directory.

    The licence check is coqui's own (``tos_agreed``), satisfied by ``accept`` or coqui's marks; its prompt
    (``ask_tos``, an ``input()``) is replaced by an error, so nothing ever waits for a keyboard.
    """
    from tts_gateway.engines.torch_compat import import_torchaudio

    import_torchaudio()
    from TTS.utils.manage import ModelManager

    class NoPromptModelManager(ModelManager):
        def tos_agreed(self, model_item: Any, model_full_path: Any) -> bool:
            return accept or bool(ModelManager.tos_agreed(model_item, model_full_path))

        @staticmethod
        def ask_tos(model_full_path: Any) -> bool:
            raise LicenceNotAccepted(not_accepted_reason(model))

    remove_stale_partials(model)
    manager = NoPromptModelManager(progress_bar=False)
    _model_path, config_path, _item = manager.download_model(model.name)
    checkpoint = cached_checkpoint(model)
    if checkpoint is None or config_path is None:
        raise RuntimeError(f"coqui-tts downloaded {model.repo_id}, but the snapshot in {repo_storage(model)} "
                           f"is incomplete or lacks {', '.join(REQUIRED_FILES)}")
    return Path(config_path).parent


def not_accepted_reason(model: CoquiModel) -> str:
    return (f"XTTS v2 is not downloaded, and it is under the Coqui Public Model License ({CPML_URL}: "
            f"non-commercial use unless you bought a licence from Coqui), which has not been accepted. To accept it, "
            f"run `{PULL_COMMAND}` (downloads it now, about 1.9 GB) or set TTS_GATEWAY_ACCEPT_CPML=1 (downloaded "
            "on first use); or point TTS_GATEWAY_XTTS_CHECKPOINT at a checkpoint directory")


def _exit_with_parent() -> None:
    """Stop when the process that started this download goes away (a killed server leaves no orphan)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tts_gateway.engines.xtts_models fetch NAME [--accept-license]``: one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m tts_gateway.engines.xtts_models")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="download a coqui-tts model through its ModelManager")
    fetch_parser.add_argument("name", nargs="?", default=XTTS_V2)
    fetch_parser.add_argument("--accept-license", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _exit_with_parent()
    model = coqui_model(args.name)
    try:
        checkpoint = fetch(model, accept=args.accept_license)
    except LicenceNotAccepted as exc:
        print(json.dumps({"error": str(exc), "licence": True}), flush=True)
        return EXIT_LICENCE
    except BaseException as exc:  # reported to the parent as one line; KeyboardInterrupt too
        print(json.dumps({"error": one_line(exc)}), flush=True)
        return 1
    print(json.dumps({"checkpoint": str(checkpoint)}), flush=True)
    return 0


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- watching a download (in the gateway or the CLI) ---------------------------------------------------
State = Literal["idle", "running", "done", "failed"]


class ModelDownload:
    """One model's download: a child process watched by a daemon thread, with state, progress and retries.

    Args:
        model: The coqui-tts model.
        retry_s: After a failure, the next start waits this long (doubling with each failure, up to
            ``retry_max_s``) so clients retrying requests do not hammer the hub.
    """

    def __init__(self, model: CoquiModel, *, retry_s: float = 5.0, retry_max_s: float = 300.0) -> None:
        self.model = model
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self._lock = threading.Lock()
        self._state: State = "idle"
        self._process: subprocess.Popen[bytes] | None = None
        self._started_wall = 0.0
        self._retry_at = 0.0
        self.failures = 0
        self.error: str | None = None
        self.checkpoint: Path | None = None
        self.licence_refused = False
        self._atexit = False

    @property
    def state(self) -> State:
        return self._state

    @property
    def running(self) -> bool:
        return self._state == "running"

    def retry_in(self) -> float:
        """Seconds until a failed download may start again (0: now)."""
        return max(0.0, self._retry_at - time.monotonic())

    def start(self, *, accept: bool) -> bool:
        """Start fetching unless already running or waiting out a failure; True when it runs now."""
        with self._lock:
            if self._state == "running" or (self._state == "failed" and self.retry_in() > 0):
                return self._state == "running"
            command = [sys.executable, "-m", "tts_gateway.engines.xtts_models", "fetch", self.model.name]
            if accept:
                command.append("--accept-license")
            out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the watcher
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            except OSError as exc:
                out.close()
                self._fail(one_line(exc))
                return False
            self._process = process
            self._state = "running"
            self._started_wall = time.time()
            self.error = None
            self.licence_refused = False
            log.info("downloading %s (%s) from %s", self.model.name, self.model.repo_id, hub_endpoint())
            if not self._atexit:  # a gateway that exits stops its download
                atexit.register(self.cancel)
                self._atexit = True
        threading.Thread(target=self._watch, args=(process, out), name="xtts-download", daemon=True).start()
        return True

    def _watch(self, process: subprocess.Popen[bytes], out: Any) -> None:
        code = process.wait()
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
        out.close()
        result: dict[str, Any] = {}
        for line in reversed(text.splitlines()):
            if line.startswith("{"):
                try:
                    result = json.loads(line)
                    break
                except ValueError:
                    continue
        with self._lock:
            if self._process is not process:  # cancelled meanwhile
                return
            self._process = None
            if code == 0 and result.get("checkpoint"):
                self._state = "done"
                self.failures = 0
                self.checkpoint = Path(result["checkpoint"])
                log.info("downloaded %s to %s", self.model.name, self.checkpoint)
                return
            if code == EXIT_LICENCE:
                self.licence_refused = True
            tail = " ".join(text.strip().splitlines()[-3:])[-300:] or f"exit status {code}"
            self._fail(str(result.get("error") or tail))
        log.warning("downloading %s failed: %s", self.model.name, self.error)

    def _fail(self, error: str) -> None:
        self._state = "failed"
        self.error = error
        self.failures += 1
        self._retry_at = time.monotonic() + min(self.retry_s * 2 ** (self.failures - 1), self.retry_max_s)

    def wait(self, timeout: float | None = None) -> State:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1)
        return self._state

    def cancel(self) -> None:
        """Stop a running download (its finished files stay in the cache; the file in flight starts over)."""
        with self._lock:
            process, self._process = self._process, None
            if process is None:
                return
            self._state = "idle"
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()

    def progress(self) -> Progress:
        return download_progress(self.model, since=self._started_wall - 1.0)

    def describe(self) -> str:
        """The state as one line for the engine's reason."""
        if self._state == "running":
            return f"downloading XTTS v2 ({self.model.repo_id} from {hub_endpoint()}): {self.progress().describe()}"
        if self._state == "failed":
            wait = math.ceil(self.retry_in())
            when = f"the next load retries in {wait} s" if wait > 0 else "the next load retries"
            return (f"downloading XTTS v2 ({self.model.repo_id} from {hub_endpoint()}) failed: {self.error}; "
                    f"{when} (or run `{PULL_COMMAND}`)")
        return "XTTS v2 is not downloaded"


@dataclass(frozen=True)
class Reach:
    """What the last look at the hub found: ``ok`` (None before the first look), why not, when it looks again."""

    ok: bool | None
    error: str | None = None
    next_check: float = 0.0

    def recheck_in(self) -> float:
        return max(0.0, self.next_check - time.monotonic())


class HubProbe:
    """Whether the Hugging Face endpoint answers for the model now: "can fetch one now" for availability.

    Looks in a background thread and remembers the answer (a success for ``ok_ttl_s``, a failure for a
    backoff that doubles up to ``retry_max_s``), so asking never blocks a caller for longer than the first
    look's ``timeout_s``; a look that is due runs in the background while the last answer stands.
    """

    def __init__(self, model: CoquiModel, *, timeout_s: float = 3.0, ok_ttl_s: float = 60.0,
                 retry_s: float = 5.0, retry_max_s: float = 300.0) -> None:
        self.model = model
        self.timeout_s = timeout_s
        self.ok_ttl_s = ok_ttl_s
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self._lock = threading.Lock()
        self._reach = Reach(ok=None)
        self._failures = 0
        self._looking: threading.Thread | None = None

    def url(self) -> str:
        return f"{hub_endpoint().rstrip('/')}/api/models/{self.model.repo_id}/revision/main"

    def reach(self) -> Reach:
        """The last answer, starting a look when one is due (and waiting for the very first one)."""
        with self._lock:
            reach, looking = self._reach, self._looking
            if looking is None and (reach.ok is None or reach.recheck_in() == 0):
                looking = self._looking = threading.Thread(target=self._look, name="xtts-hub-probe", daemon=True)
                looking.start()
        if reach.ok is None and looking is not None:
            looking.join(self.timeout_s + 1.0)
            with self._lock:
                reach = self._reach
        return reach

    def _look(self) -> None:
        import urllib.error
        import urllib.request

        error: str | None = None
        try:
            url = self.url()
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"HF_ENDPOINT {hub_endpoint()!r} is not an http(s) address")
            request = urllib.request.Request(url, headers={"user-agent": "tts-gateway"})  # noqa: S310 - checked above
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                response.read(1)
        except urllib.error.HTTPError as exc:
            error = f"it answered {exc.code}"
        except urllib.error.URLError as exc:
            error = one_line(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)
        except (OSError, ValueError) as exc:
            error = one_line(exc)
        now = time.monotonic()
        with self._lock:
            if error is None:
                self._failures = 0
                self._reach = Reach(ok=True, next_check=now + self.ok_ttl_s)
            else:
                self._failures += 1
                wait = min(self.retry_s * 2 ** (self._failures - 1), self.retry_max_s)
                self._reach = Reach(ok=False, error=error, next_check=now + wait)
            self._looking = None


if __name__ == "__main__":
    sys.exit(main())
