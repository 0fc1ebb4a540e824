"""Repositories open from a zoo or from paths, and reject broken experts up front naming expert and tensor."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from evomerge.errors import RepositoryError
from evomerge.repository import Repository
from tests.helpers import tiny


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    base = tiny.build_base(root / "base")
    tiny.build_full_expert(base, root / "experts" / "full", seed=1)
    tiny.build_lora_expert(base, root / "experts" / "lora", seed=2)
    return root


@pytest.fixture
def repo_dir(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "r")
    return tmp_path / "r"


def edit(path, fn):
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def test_open_zoo_manifest_and_from_paths(repo_dir):
    tiny.write_zoo(repo_dir, {"full": {"path": "experts/full", "kind": "full", "task": "add", "distractor": False},
                               "lora": {"path": "experts/lora", "kind": "lora", "task": None, "distractor": True}},
                    {"add": {"train": "tasks/add/train.jsonl", "search": "tasks/add/search.jsonl", "test": "tasks/add/test.jsonl"}})
    repo = Repository.open(repo_dir)
    assert repo.expert("full").kind == "full" and repo.expert("full").task == "add"
    assert repo.expert("lora").distractor and repo.preset == "tiny"
    assert repo.tasks["add"]["test"] == repo_dir / "tasks/add/test.jsonl"
    module = repo.expert("lora").modules["model.layers.1.self_attn.q_proj.weight"]
    assert (module.rank, module.scaling) == (4, 2.0)
    other = Repository.from_paths(repo_dir / "base", experts=[repo_dir / "experts" / "lora"])
    assert list(other.experts) == ["lora"]
    scanned = Repository.from_paths(repo_dir / "base", experts_dir=repo_dir / "experts")
    assert sorted(scanned.experts) == ["full", "lora"]
    with pytest.raises(RepositoryError, match="no expert named 'nope'"):
        repo.expert("nope")


def test_rejects_nan_naming_the_tensor(repo_dir):
    key = "model.layers.1.mlp.down_proj.weight"
    edit(repo_dir / "experts/full/model.safetensors", lambda t: t[key].view(-1).__setitem__(3, float("nan")))
    with pytest.raises(RepositoryError, match=f"expert 'full': tensor {key} holds NaN"):
        Repository.from_paths(repo_dir / "base", experts_dir=repo_dir / "experts")


def test_rejects_wrong_shape(repo_dir):
    key = "model.layers.0.mlp.up_proj.weight"
    edit(repo_dir / "experts/full/model.safetensors", lambda t: t.__setitem__(key, t[key][:-1].contiguous()))
    with pytest.raises(RepositoryError, match=f"expert 'full': tensor {key} has shape"):
        Repository.from_paths(repo_dir / "base", experts_dir=repo_dir / "experts")


def test_rejects_missing_tensor_and_missing_files(repo_dir):
    edit(repo_dir / "experts/full/model.safetensors", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(RepositoryError, match="expert 'full': tensor model.norm.weight is missing"):
        Repository.from_paths(repo_dir / "base", experts=[repo_dir / "experts/full"])
    (repo_dir / "experts/lora/adapter_model.safetensors").unlink()
    with pytest.raises(RepositoryError, match="expert 'lora': no \\*.safetensors"):
        Repository.from_paths(repo_dir / "base", experts=[repo_dir / "experts/lora"])


def test_rejects_unreadable_safetensors(repo_dir):
    (repo_dir / "experts/full/model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(RepositoryError, match="expert 'full': cannot read"):
        Repository.from_paths(repo_dir / "base", experts=[repo_dir / "experts/full"])


def test_rejects_lora_rank_that_disagrees_with_config(repo_dir):
    cfg = json.loads((repo_dir / "experts/lora/adapter_config.json").read_text())
    cfg["r"] = 8
    (repo_dir / "experts/lora/adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(RepositoryError, match="expert 'lora': tensor .*lora_A.weight .* rank 8"):
        Repository.from_paths(repo_dir / "base", experts=[repo_dir / "experts/lora"])


def test_rejects_lora_target_absent_from_base(repo_dir):
    def rename(t):
        for k in [k for k in t if "layers.1.self_attn.q_proj" in k]:
            t[k.replace("q_proj", "qq_proj")] = t.pop(k)
    edit(repo_dir / "experts/lora/adapter_model.safetensors", rename)
    with pytest.raises(RepositoryError, match="target module model.layers.1.self_attn.qq_proj does not exist"):
        Repository.from_paths(repo_dir / "base", experts=[repo_dir / "experts/lora"])


def test_rejects_other_architecture_and_wrong_kind(repo_dir):
    cfg = json.loads((repo_dir / "experts/full/config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (repo_dir / "experts/full/config.json").write_text(json.dumps(cfg))
    with pytest.raises(RepositoryError, match="expert 'full': architecture differs .*num_hidden_layers"):
        Repository.from_paths(repo_dir / "base", experts=[repo_dir / "experts/full"])
    tiny.write_zoo(repo_dir, {"lora": {"path": "experts/lora", "kind": "full"}})
    with pytest.raises(RepositoryError, match="listed as full but .* holds a lora"):
        Repository.open(repo_dir)



def test_tensor_reader_views_equal_the_file_and_never_write_to_it(repo_dir):
    from evomerge.repository import TensorReader

    path = repo_dir / "experts" / "full" / "model.safetensors"
    expected = load_file(str(path))
    files = {k: path for k in expected}
    with TensorReader() as reader:
        for key, tensor in expected.items():
            view = reader.get(files, key)
            assert view.dtype == tensor.dtype and view.shape == tensor.shape and bool((view == tensor).all())
        reader.get(files, key).fill_(7.0)  # a private map: the write copies the page, the file keeps its bytes
    assert bool((load_file(str(path))[key] == expected[key]).all())


def test_tensor_reader_names_a_truncated_file(repo_dir):
    from evomerge.repository import TensorReader

    path = repo_dir / "experts" / "full" / "model.safetensors"
    keys = list(load_file(str(path)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])
    with TensorReader() as reader, pytest.raises(RepositoryError, match="file ends inside tensor"):
        for key in keys:
            reader.get({k: path for k in keys}, key)
