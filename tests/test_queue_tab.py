"""The Data Manager queue tab (demo and QUEUE_TAB=true) and the secret-free Label Studio command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import ls_bootstrap as lsb
from backend import queue_tab
from backend.app import create_app
from backend.config import Config
from backend.queue_tab import QUEUE_ORDERING, QUEUE_TAB_TITLE, ensure_queue_tab
from conftest import PROJECT_ID


@dataclass
class FakeView:
    id: int
    data: dict[str, Any]
    order: int | None = None


@dataclass
class FakeViews:
    views: list[FakeView] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)
    orders: list[list[int]] = field(default_factory=list)

    def list(self, *, project: int) -> list[FakeView]:
        return list(self.views)

    def create(self, *, project: int, data: dict[str, Any]) -> FakeView:
        view = FakeView(id=100 + len(self.created), data=data, order=None)
        self.created.append(data)
        self.views.append(view)
        return view

    def update_order(self, *, project: int, ids: list[int]) -> None:
        self.orders.append(list(ids))
        for position, view_id in enumerate(ids):
            next(v for v in self.views if v.id == view_id).order = position


@dataclass
class FakeClient:
    views: FakeViews = field(default_factory=FakeViews)


def test_queue_tab_is_created_ordered_by_ascending_score_and_first():
    client = FakeClient(FakeViews([FakeView(1, {"title": "Default"}, order=0), FakeView(2, {"title": "Mine"}, 1)]))
    tab = ensure_queue_tab(client, 7)  # type: ignore[arg-type]
    (data,) = client.views.created
    assert data["title"] == QUEUE_TAB_TITLE and data["ordering"] == QUEUE_ORDERING == ["tasks:predictions_score"]
    assert data["filters"] == {"conjunction": "and", "items": []}
    assert client.views.orders == [[tab, 1, 2]]


def test_queue_tab_is_not_duplicated_and_an_existing_one_is_moved_first():
    client = FakeClient()
    first = ensure_queue_tab(client, 7)  # type: ignore[arg-type]
    assert ensure_queue_tab(client, 7) == first  # type: ignore[arg-type]
    assert len(client.views.created) == 1 and client.views.orders == []  # the only tab is already first
    client.views.views.insert(0, FakeView(1, {"title": "Default"}, order=-1))
    assert ensure_queue_tab(client, 7) == first  # type: ignore[arg-type]
    assert client.views.orders == [[first, 1]] and len(client.views.created) == 1


def setup_body(fake_ls) -> dict[str, Any]:
    return {"project": f"{PROJECT_ID}.1795294297", "schema": fake_ls.label_config, "hostname": fake_ls.url,
            "access_token": "a-token-from-setup", "extra_params": None}


@pytest.mark.parametrize("enabled", [False, True])
def test_backend_makes_the_queue_tab_at_setup_only_when_asked(fake_ls, make_config, make_backend, monkeypatch,
                                                              enabled):
    calls: list[tuple[str, int]] = []

    def fake_ensure(client, project_id):
        calls.append((client._client_wrapper.get_base_url(), project_id))
        return 42

    monkeypatch.setattr(queue_tab, "ensure_queue_tab", fake_ensure)
    parts = make_backend(make_config(push_predictions=False, queue_tab=enabled))
    client = create_app(parts.backend.config, parts.backend).test_client()
    for _ in range(2):  # Label Studio calls /setup on most reads: the tab is made once
        assert client.post("/setup", json=setup_body(fake_ls)).status_code == 200
    assert calls == ([(fake_ls.url, PROJECT_ID)] if enabled else [])


def test_queue_tab_setting_is_off_by_default_and_read_from_the_environment():
    assert Config.from_env({}).queue_tab is False
    assert Config.from_env({"QUEUE_TAB": "true"}).queue_tab is True


def test_label_studio_gets_its_login_from_the_environment_not_the_command_line(tmp_path: Path):
    login = lsb.LabelStudioLogin("someone@example.org", "pass-word-123456", "t" * 40)
    server = lsb.LabelStudioServer(tmp_path / "venv", tmp_path / "data", tmp_path / "files", login, port=18999)
    command = " ".join(server.command)
    for secret in (login.password, login.token):
        assert secret not in command
    assert server.env["LABEL_STUDIO_USERNAME"] == login.username
    assert server.env["LABEL_STUDIO_PASSWORD"] == login.password
    assert server.env["LABEL_STUDIO_USER_TOKEN"] == login.token
    assert "--enable-legacy-api-token" in server.command
