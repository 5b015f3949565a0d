"""``python -m service``: serve the default model on TTA_HOST:TTA_PORT (0.0.0.0:8000)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def serve(**overrides) -> None:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False)


if __name__ == "__main__":
    serve()
