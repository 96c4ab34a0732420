"""WSGI entry point: ``gunicorn backend.wsgi:app``. Models load at import, i.e. when a gunicorn worker starts."""

import sys

from backend.app import create_app
from backend.config import Config, ConfigError
from backend.state import ModelDirError

# Fits run in threads of this process. A shorter GIL switch interval (default 5 ms) lets request threads
# in sooner while a fit holds the interpreter, which keeps /health within Label Studio's 1 s easily.
sys.setswitchinterval(0.001)

try:
    app = create_app(Config.from_env())
except (ConfigError, ModelDirError) as exc:
    # One clear line instead of a traceback; exit code 3 is gunicorn's "worker failed to boot" (the arbiter stops).
    print(f"vlm-al-backend: {exc}", file=sys.stderr, flush=True)
    sys.exit(3)
