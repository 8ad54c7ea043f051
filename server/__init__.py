"""server: the FastAPI + uvicorn service that runs, stores and streams training runs (issue #4)."""
