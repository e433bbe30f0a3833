"""Every YAML preset under configs/ parses, so a preset cannot rot."""

from pathlib import Path

import pytest

from cluster.tune import SearchConfig, load_search
from flm.config import GrowthPlan, ProxyFamily, load_yaml, parse

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert {p.name for p in PRESETS} >= {"flm-101b.yaml", "tiny.yaml", "proxy.yaml", "search.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_parse(path):
    data = load_yaml(path)
    if "grid" in data:  # a proxy hyperparameter search (flm tune)
        search = load_search(path)
        assert isinstance(search, SearchConfig) and search.grid.size >= 1 and search.steps >= 1
        return
    obj = parse(ProxyFamily if "widths" in data else GrowthPlan, data, str(path))
    if isinstance(obj, GrowthPlan):
        assert len(obj.model_configs()) == len(obj.stages)
    else:
        assert [obj.at_width(w).d_model for w in obj.widths] == obj.widths


def test_tiny_ends_near_4x256():
    plan = parse(GrowthPlan, load_yaml(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"))
    final = plan.model_configs()[-1]
    assert (final.n_layer, final.d_model) == (4, 256) and len(plan.stages) == 3
