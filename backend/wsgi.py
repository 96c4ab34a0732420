"""WSGI entry point: ``gunicorn backend.wsgi:app``. Models load at import, i.e. when a gunicorn worker starts."""

import sys

from backend.app import create_app
from backend.config import Config

# Fits run in threads of this process. A shorter GIL switch interval (default 5 ms) lets request threads
# in sooner while a fit holds the interpreter, which keeps /health within Label Studio's 1 s easily.
sys.setswitchinterval(0.001)

app = create_app(Config.from_env())
