"""The edge: Taskman's HTTP API (FastAPI), served by ``taskman edge``; see ``app.create_app``."""
