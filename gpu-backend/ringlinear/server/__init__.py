"""The pod's OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine."""

from .app import PodSettings, create_app

__all__ = ["PodSettings", "create_app"]
