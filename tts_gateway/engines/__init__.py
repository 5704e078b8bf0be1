"""Engines: hookspecs, the engine protocol, the manager and the built-in engine plugins."""
