"""The edge: Taskman's HTTP API (FastAPI), served by ``taskman edge``."""

from worker.edge.app import create_app

__all__ = ["create_app"]
