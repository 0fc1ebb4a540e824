"""The SmolLM2 zoo (tens of CPU minutes): run with `pytest -m slow`."""

from __future__ import annotations

import json
import os

import pytest

from evomerge.zoo import build


@pytest.mark.slow
def test_smol_zoo_experts_beat_the_base(tmp_path):
    out = build("smol", os.environ.get("EVOMERGE_SMOL_ZOO") or tmp_path / "smol", seed=0, progress=False)
    m = json.loads((out / "zoo.json").read_text())
    real = {n: e for n, e in m["experts"].items() if not e["distractor"]}
    assert len(real) >= 8 and sum(e["distractor"] for e in m["experts"].values()) >= 24
    for name, e in real.items():
        base = m["base_metrics"][e["task"]]
        assert e["metrics"]["exact_match"] > base["exact_match"] or e["metrics"]["ce"] < 0.5 * base["ce"], name
