"""The Litestar HTTP layer: routes, auth, admission control and problem+json errors."""

from tts_gateway.gateway.app import create_app

__all__ = ["create_app"]
