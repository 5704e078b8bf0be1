"""Every use of a Ray API without a stability promise (private names, developer APIs), in one place.

Ray is pinned (``ray[serve]==2.60.*``); when an upgrade moves one of these, this file is the whole
list to check. Ray is imported inside each function: the default install has no Ray.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def deploy_nonblocking(application: Any, name: str) -> None:
    """Deploy ``application`` without waiting for it to run (the caller polls `serve.status`, so a
    deployment that cannot start is reported with its reason instead of waiting without end).
    ``serve.run`` has no such option; ``serve._run`` with ``_blocking=False`` is what it calls."""
    from ray import serve

    serve._run(application, _blocking=False, name=name, route_prefix=None)


def delete_nonblocking(name: str) -> None:
    """Delete an application without waiting for its replicas to stop (``serve.delete``'s private flag)."""
    from ray import serve

    serve.delete(name, _blocking=False)


def refresh_auth_config() -> None:
    """Make this process see the token auth set in ``os.environ`` after Ray was imported: Ray caches
    its config at import, and only its private ``_raylet`` classes re-read it."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as exc:
        log.warning("could not refresh Ray's auth config (%s); import ray after start()", exc)


def local_node_options(node_ip_address: str, temp_dir: str) -> dict[str, Any]:
    """``ray.init`` options for a local cluster's address and temp dir (Ray names them privately)."""
    return {"_node_ip_address": node_ip_address, "_temp_dir": temp_dir}


def replica_id() -> str:
    """This Serve replica's unique id (``get_replica_context`` is a developer API); replicas only."""
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)
