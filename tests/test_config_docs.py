"""docs/configuration.md is generated from the configuration tree (`mosaic_ray/config_docs.py`)."""

import pytest

from mosaic_ray import config_docs
from mosaic_ray.config_docs import PAGE, render, sections


def test_the_page_is_what_the_models_generate():
    assert PAGE.read_text() == render(), "docs/configuration.md is stale: run python -m mosaic_ray.config_docs"


def test_every_model_of_the_tree_has_a_section_at_its_place():
    places = {model.__name__: place for place, model in sections()}
    assert places["EngineConfig"] == "app.runtime.engine.kwargs"
    assert places["ClusterConfig"] == "app.runtime.engine.kwargs.cache.cluster"
    assert places["RealtimeSpec"] == "app.ingress.realtime"
    text = render()
    for name in places:
        assert f"## {name} " in text
    # one row per field, with its bounds and choices
    assert "| variance_ratio | `0.5` | > 0, <= 100 |" in text
    assert "| retrieval | `cluster` | `full` \\| `frame` \\| `token` \\| `cluster` |" in text


def test_a_field_without_a_description_stops_the_page(monkeypatch):
    from pydantic import Field

    from mosaic_ray.config_model import ConfigModel

    class Bare(ConfigModel):
        """A section."""

        knob: int = Field(1)

    monkeypatch.setattr(config_docs, "sections", lambda: [("bare", Bare)])
    with pytest.raises(ValueError, match="Bare.knob has no description"):
        render()


def test_check_mode_reports_a_stale_page(tmp_path, monkeypatch):
    monkeypatch.setattr(config_docs, "PAGE", tmp_path / "configuration.md")
    assert config_docs.main(["--check"]) == 1
    assert config_docs.main([]) == 0 and config_docs.main(["--check"]) == 0
