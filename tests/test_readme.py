"""The README stays true: its request example, flag table, commands and routes match the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.__main__ import build_parser
from app.serving.core.schema import CATALOG_EXAMPLE, Limits, build_schema

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _curl_body() -> dict:
    match = re.search(r"curl -s localhost:8080/v1/models/kandinsky:predict .*?-d '(\{.*?\})'", README, re.S)
    assert match, "README has no curl predict example"
    return json.loads(match.group(1))


def test_readme_curl_example_is_the_catalog_example_and_validates() -> None:
    body = _curl_body()
    assert body == CATALOG_EXAMPLE
    (instance,) = build_schema(Limits()).parse(body)
    assert instance.params.images_to_gen == 4


def test_readme_flag_table_lists_exactly_our_flags_with_their_defaults() -> None:
    from kserve import model_server

    kserve_flags = {a.dest for a in model_server.parser._actions}
    actions = build_parser()._actions
    ours = {a.dest: a.default for a in actions if a.dest not in kserve_flags and a.dest != "help"}
    rows = dict(re.findall(r"^\| `--(\w+)` \| `([^`]*)` \|", README, re.M))
    assert set(rows) == set(ours)
    for flag, default in ours.items():
        shown = '""' if default == "" else str(int(default) if isinstance(default, float) else default)
        assert rows[flag] == shown, flag  # an empty string default is shown as `""`


@pytest.mark.parametrize("target", ["run", "test"])
def test_the_two_commands_are_make_targets_and_ci_runs_the_test_one(target: str) -> None:
    assert f"make {target}" in README
    assert re.search(rf"^{target}:", (ROOT / "Makefile").read_text(), re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_get_route_the_readme_names_is_served() -> None:
    from tests.support import _served_routes

    served = {path for path, methods in _served_routes().items() if "GET" in methods}
    named = re.findall(r"`GET (/[^`]+)`", README)
    assert len(named) >= 5
    for route in named:
        template = re.sub(r"/v1/models/(<name>|[\w-]+)", "/v1/models/{model_name}", route)
        assert template in served, route
