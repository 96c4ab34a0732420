"""bench/task_listing.py against the real Label Studio: the listing an index asks for (``include``) is what Label
Studio 1.23.2 answers with, and it sends less for it."""

from __future__ import annotations

import sys

import pytest

from backend.ls_client import TASK_COUNTS_READ

from .conftest import REPO_ROOT, Stack, make_project

pytestmark = pytest.mark.e2e


def test_label_studio_sends_only_the_fields_a_listing_includes(stack: Stack, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    sys.modules.pop("task_listing", None)
    import task_listing

    project = make_project(stack, "e2e task listing", 12, seed=5)
    measured = task_listing.measure(stack.label_studio.url, stack.login.token, stack.label_studio.process.pid,
                                    project.project_id, rounds=1, images=3)
    listings = measured["listings"]
    assert {listing["tasks"] for listing in listings.values()} == {12}
    assert listings["task_only_include"]["fields"] == sorted(("id", "data", *TASK_COUNTS_READ))
    assert listings["all_include"]["fields"] == ["annotations", "data", "id"]
    for name in ("task_only", "all"):  # without include: Label Studio's ~30 fields
        assert len(listings[name]["fields"]) > 20
        assert listings[name]["bytes"] > 3 * listings[f"{name}_include"]["bytes"]
    for way in ("serving_images", "serving_images_one_connection"):
        served = measured[way]
        assert served["images"] == 3 and served["bytes"] > 0 and served["label_studio_cpu_ms_per_image"] >= 0
    assert measured["serving_images"]["bytes"] == measured["serving_images_one_connection"]["bytes"]
