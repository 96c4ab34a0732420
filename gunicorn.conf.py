"""gunicorn settings for `gunicorn backend.wsgi:app` (gunicorn loads ./gunicorn.conf.py by default).

Workers, threads and log level come from the one Config object, so `vlm-al serve`, this file and Docker agree.
"""

from backend.config import Config

_config = Config.from_env()

bind = "127.0.0.1:9090"  # overridden by --bind; Docker passes 0.0.0.0
workers = _config.workers
threads = _config.threads
# gthread, but requests are read in full (REQUEST_READ_TIMEOUT_SECONDS, MAX_REQUEST_BYTES) before they take a
# thread, so slow clients cannot starve /health (backend/worker.py)
worker_class = "backend.worker.BufferedThreadWorker"
loglevel = _config.log_level.lower()
# Jobs run on background threads inside the worker (or on `vlm-al worker` processes with REDIS_URL), so a long
# request timeout is not needed;
# /predict of a large uncached batch is the slowest request Label Studio sends (it waits 100 s).
timeout = 120
graceful_timeout = 30
