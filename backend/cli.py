"""``vlm-al``: serve the backend, run its job workers (REDIS_URL), run the offline simulation, or start the demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9090


def _server_config(command: str) -> Any:
    """The environment's Config with a usable MODEL_DIR, or None after printing why not."""
    from backend.config import Config, ConfigError
    from backend.state import ModelDirError, check_model_dir

    try:
        config = Config.from_env()
        check_model_dir(config.model_dir)
    except (ConfigError, ModelDirError) as exc:
        print(f"vlm-al {command}: {exc}", file=sys.stderr)
        return None
    return config


def _serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    config = _server_config("serve")
    if config is None:
        return 2

    class _Server(BaseApplication):
        def load_config(self) -> None:
            settings: dict[str, Any] = {
                "bind": f"{args.host}:{args.port}",
                "workers": args.workers or config.workers,
                "threads": args.threads or config.threads,
                "loglevel": config.log_level.lower(),
                # fits run in background threads; the slowest request is /predict of an uncached batch
                "timeout": 120,
                "graceful_timeout": 30,
                # gthread that hands a request to a thread only once it has fully arrived (backend/worker.py):
                # slow clients cannot hold the threads /health needs
                "worker_class": "backend.worker.BufferedThreadWorker",
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):  # called in each worker: models load there, not in the arbiter
            from backend.wsgi import app

            return app

    _Server().run()
    return 0


def _worker(args: argparse.Namespace) -> int:
    config = _server_config("worker")
    if config is None:
        return 2
    if not config.redis_url:
        print("vlm-al worker: REDIS_URL is not set (without it, `vlm-al serve` runs jobs in-process)",
              file=sys.stderr)
        return 2
    import logging

    from backend.config import configure_logging
    from backend.rq_jobs import run_worker
    from backend.service import MLBackend

    redactor = configure_logging(config)
    if config.log_level != "DEBUG":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Label Studio call otherwise
    return run_worker(MLBackend.from_config(config, redactor=redactor), config, burst=args.burst, name=args.name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vlm-al", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the ML backend under gunicorn")
    serve.add_argument("--host", default=DEFAULT_HOST)
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--workers", type=int, default=None, help="default: WORKERS")
    serve.add_argument("--threads", type=int, default=None, help="default: THREADS")
    worker = commands.add_parser("worker", help="run background jobs from Redis (REDIS_URL); web processes enqueue")
    worker.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    worker.add_argument("--name", default=None, help="worker name (default: host and process id)")
    commands.add_parser("simulate", help="offline active-learning benchmark (options: vlm-al simulate --help)",
                        add_help=False)
    commands.add_parser("demo", help="start Label Studio and this backend, connected (vlm-al demo --help)",
                        add_help=False)
    commands.add_parser("replay", help="the product's learning curve through a real Label Studio "
                        "(vlm-al replay --help)", add_help=False)
    if argv and argv[0] in ("simulate", "demo", "replay"):
        command, rest = argv[0], argv[1:]
        if command == "simulate":
            from model.simulate import main as simulate_main

            return int(simulate_main(rest) or 0)
        if command == "replay":
            from harness.replay import main as replay_main

            return int(replay_main(rest) or 0)
        from harness.demo import main as demo_main

        return int(demo_main(rest) or 0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "worker":
        return _worker(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
