"""lmcompress.turbo.server: the OpenAI-compatible HTTP API of `lmc serve` (FastAPI over AsyncEngine).

    from lmcompress.turbo.server.app import ServerOptions, build_app
"""
