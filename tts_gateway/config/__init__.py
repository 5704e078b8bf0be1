"""Settings, read once from the environment at start and passed down."""

from tts_gateway.config.settings import ApiKey, Settings, SettingsError

__all__ = ["ApiKey", "Settings", "SettingsError"]
