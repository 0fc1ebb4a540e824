"""A zoo folder is reused only when every file its manifest lists is there."""

import json

from evomerge.zoo.builder import FORMAT, MANIFEST, _matches


def test_a_damaged_zoo_is_not_reused(tmp_path):
    manifest = {"preset": "tiny", "seed": 0, "format": FORMAT, "base": "base",
                "experts": {"upper": {"path": "experts/upper"}},
                "tasks": {"upper": {"search": "tasks/upper/search.jsonl"}}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    for d in ("base", "experts/upper", "tasks/upper"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "base" / "config.json").write_text("{}")
    assert not _matches(tmp_path, manifest, "tiny", 0)  # the task file is missing
    (tmp_path / "tasks/upper/search.jsonl").write_text("")
    assert _matches(tmp_path, manifest, "tiny", 0)
    assert not _matches(tmp_path, manifest, "tiny", 1)
    assert not _matches(tmp_path, manifest, "smol", 0)
