"""WSGI entry point: ``gunicorn backend.wsgi:app``. Models load at import, i.e. when a gunicorn worker starts."""

from backend.app import create_app
from backend.config import Config

app = create_app(Config.from_env())
