"""pycma behind a non-blocking ask: generations, ask-ahead, stale and replayed points stay sane."""

from __future__ import annotations

import warnings

import numpy as np

from evomerge.optimizers import make_optimizer
from evomerge.search_spaces import EvoSpace

SPACE = EvoSpace(("a", "b", "c", "d", "e"), "joint")


def test_generations_follow_tells_not_asks():
    opt = make_optimizer("cma", SPACE, seed=0, popsize=8)
    asked = [opt.ask() for _ in range(20)]  # 2.5 generations ahead
    assert opt.generations == 0
    for i, z in enumerate(asked):
        opt.tell(z, float(np.sum(z ** 2)))
        assert opt.generations == (i + 1) // 8
    assert len({z.tobytes() for z in asked}) == 20


def test_ask_ahead_replay_and_stale_points_raise_no_warning_and_keep_sigma_sane():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = make_optimizer("cma", SPACE, seed=0, popsize=8)
        rng = np.random.default_rng(0)
        for z in rng.uniform(SPACE.lower, SPACE.upper, size=(40, SPACE.dim)):  # replay, never asked
            opt.tell(z, float(np.sum(z ** 2)))
        stale = [opt.ask() for _ in range(30)]
        for z in stale[::-1]:
            opt.tell(z, float(np.sum(z ** 2)))
        for _ in range(400):
            z = opt.ask()
            opt.tell(z, float(np.sum(z ** 2)))
    width = float(np.max(SPACE.upper - SPACE.lower))
    assert 0 < opt.step_size < width
    assert opt.best_loss < 1e-3  # the optimum (α = 0, β = 0) is still found


def _continue(opt) -> list[list[float]]:
    zs = []
    for _ in range(36):
        z = opt.ask()
        zs.append(z.tolist())
        opt.tell(z, float(np.sum((z - 0.3) ** 2)))
    return zs


def test_a_pickle_resumes_identically_in_another_process():
    """pycma keys its archives by a per-process salted hash; a resumed process must not diverge."""
    import ast
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    opt = make_optimizer("cma", SPACE, seed=3, popsize=6)
    for k in range(16):  # a checkpoint in mid-generation, with asked-but-untold points in pycma's archive
        z = opt.ask()
        if k % 4 != 3:
            opt.tell(z, float(np.sum((z - 0.3) ** 2)))
    blob = pickle.dumps(opt)
    here = _continue(pickle.loads(blob))
    code = ("import pickle, sys; from tests.optimizers.test_cma_async import _continue; "
            "print(repr(_continue(pickle.loads(sys.stdin.buffer.read()))))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), PYTHONHASHSEED="random")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env=env, check=True)
    assert ast.literal_eval(out.stdout.decode()) == here
