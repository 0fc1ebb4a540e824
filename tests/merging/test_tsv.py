"""TSV-Merge (`evo_tsv`): what decorrelating the experts' singular vectors does, on real tensors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from evomerge.merging import lora  # noqa: E402
from evomerge.merging.methods import KERNELS, Contribution  # noqa: E402

OUT, IN, R = 24, 20, 4


def adapters(*pairs: tuple[torch.Tensor, torch.Tensor]) -> lora.Stack:
    return lora.Stack.of([(f"e{i}", a, b, 1.0) for i, (a, b) in enumerate(pairs)])


def factors_of(stack: lora.Stack, betas: list[float], alphas: list[float], form) -> torch.Tensor:
    n = len(betas)
    term = lora.Term(stack, tuple(f"e{i}" for i in range(n)), torch.arange(n), torch.tensor(betas), tuple(alphas))
    b, a = form([term], "m")
    assert b.shape[1] == a.shape[0] == n * R  # an adapter of rank Σ r_i, whatever α drops
    return b @ a


def random_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)


def test_experts_in_orthogonal_subspaces_merge_as_the_sum() -> None:
    q_out, _ = torch.linalg.qr(torch.randn(OUT, 2 * R, generator=torch.Generator().manual_seed(0)))
    q_in, _ = torch.linalg.qr(torch.randn(IN, 2 * R, generator=torch.Generator().manual_seed(1)))
    mix = torch.randn(2, R, R, generator=torch.Generator().manual_seed(2))
    one = (q_in[:, :R].T, q_out[:, :R] @ mix[0])     # B_1 ⊥ B_2 and A_1 ⊥ A_2
    two = (q_in[:, R:].T, q_out[:, R:] @ mix[1])
    stack = adapters(one, two)
    merged = factors_of(stack, [0.7, -1.2], [1.0, 1.0], lora.tsv)
    torch.testing.assert_close(merged, factors_of(stack, [0.7, -1.2], [1.0, 1.0], lora.concat), atol=1e-5, rtol=0)


def test_two_identical_experts_merge_as_one_where_the_sum_counts_it_twice() -> None:
    pair = random_pair(3)
    stack = adapters(pair, pair)
    alone = pair[1] @ pair[0]
    torch.testing.assert_close(factors_of(stack, [1.0, 1.0], [1.0, 1.0], lora.tsv), alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(factors_of(stack, [1.0, 1.0], [1.0, 1.0], lora.concat), 2 * alone)


def test_alpha_keeps_an_experts_top_singular_directions() -> None:
    pair = random_pair(4)
    stack = adapters(pair)
    u, s, vh = torch.linalg.svd(pair[1] @ pair[0])
    best_rank_2 = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart–Young: the nearest rank-2 matrix
    torch.testing.assert_close(factors_of(stack, [1.0], [0.5], lora.tsv), best_rank_2, atol=1e-4, rtol=0)
    torch.testing.assert_close(factors_of(stack, [0.0 + 1.0], [0.0], lora.tsv), torch.zeros(OUT, IN))


def test_the_dense_kernel_is_the_lora_form_on_full_task_vectors() -> None:
    pairs = [random_pair(5), random_pair(6), random_pair(7)]
    betas = [0.5, -0.8, 1.1]
    contribs = [Contribution(f"e{i}", w, 1.0, lambda p=p: (p[1] @ p[0]).clone()) for i, (p, w) in
                enumerate(zip(pairs, betas, strict=True))]
    dense = KERNELS["evo_tsv"](contribs, "m", None)
    torch.testing.assert_close(dense, factors_of(adapters(*pairs), betas, [1.0] * 3, lora.tsv), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(dense, factors_of(adapters(*pairs), betas, [1.0] * 3, lora.concat), atol=1e-2)
    vector = [Contribution("e0", 2.0, 1.0, lambda: torch.ones(5))]
    torch.testing.assert_close(KERNELS["evo_tsv"](vector, "norm", None), torch.full((5,), 2.0))
