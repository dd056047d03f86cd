"""The webhook receiver: settings, the ASGI app and its parts. Never imports ``workers``."""
