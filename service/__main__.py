"""``python -m service``: serve the default model on TTA_HOST:TTA_PORT (0.0.0.0:8000)."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def uvicorn_config(app, settings):
    """How the service runs under uvicorn: its connection limits and timeouts (``service.connections``), no server
    banner, and uvicorn's own shutdown limit as a backstop behind the drain."""
    import uvicorn

    from service.connections import guarded_protocol

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          access_log=False, timeout_graceful_shutdown=settings.drain_timeout + 5,
                          http=guarded_protocol(settings.header_timeout), limit_concurrency=settings.max_connections,
                          timeout_keep_alive=settings.keep_alive_timeout, server_header=False)


def load_settings(overrides: dict):
    """The service's settings (environment, .env, then ``overrides`` that are not None); a setting that is not
    valid ends the process with exit status 2 and one line per problem, naming its variable, instead of a
    traceback."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"])
            where = f"TTA_{field.upper()}: " if field else ""
            lines.append(f"  {where}{err['msg'].removeprefix('Value error, ')}")
        print("invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def serve(**overrides) -> None:
    import uvicorn

    from service.app import begin_drain, create_app

    settings = load_settings(overrides)
    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        """On SIGTERM / SIGINT the service starts draining (``begin_drain``) as uvicorn stops listening."""

        def handle_exit(self, sig, frame) -> None:
            begin_drain(app.state.tta)
            super().handle_exit(sig, frame)

    DrainingServer(uvicorn_config(app, settings)).run()


if __name__ == "__main__":
    serve()
