"""tts-gateway: a plugin-based, multi-engine text-to-speech gateway."""

__version__ = "0.1.0"
