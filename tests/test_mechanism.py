"""Mechanism measures of P (issue 12): selectivity and mass, instance key cosine, end to end on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from timi.report import instance_key_cosine
from timi.testbed.mechanism import selectivity_and_mass
from torch_helpers import fast_base, fast_dir, fast_root, scene  # noqa: F401


def test_selectivity_and_mass_by_hand():
    P = torch.tensor([[0.3, 0.1], [0.0, 0.2], [0.05, 0.05]])
    sel, mass = selectivity_and_mass(P)
    assert sel == pytest.approx((0.75 + 1.0 + 0.5) / 3)
    assert mass == pytest.approx((0.4 + 0.2 + 0.1) / 3)


def test_key_cosine_is_one_for_shared_keys_and_zero_for_orthogonal_ones():
    H, M, L, D = 2, 4, 3, 4
    tokens = torch.tensor([[1.0, 1.0, 0, 0], [0, 0, 1.0, 1.0]])
    k = torch.zeros(H, M + L, D)
    k[:, :2, 0] = 1.0
    k[:, 2:4, 1] = 2.0  # instance 2's keys point elsewhere: cosine 0
    c = instance_key_cosine(k, tokens)
    np.testing.assert_allclose(c, np.eye(2), atol=1e-6)
    k[:, 2:4] = k[:, :2] * 3.0  # same direction, other length: cosine 1
    np.testing.assert_allclose(instance_key_cosine(k, tokens), np.ones((2, 2)), atol=1e-6)


def test_mechanism_end_to_end_on_a_tiny_model(fast_base):
    from timi.testbed.mechanism import guided_run, optimise_latent, summarise
    from timi_core import TIMIConfig
    from timi_torch import TIMIPipeline

    pipe = TIMIPipeline(fast_base)
    image, masks = scene()
    cfg = TIMIConfig(guided_steps=3, guided_layers=2)
    base = guided_run(pipe, image, masks, cfg.replace(isg=False), steps=5)
    timi = guided_run(pipe, image, masks, cfg, steps=5)
    assert len(base["layers"]) == 2 and len(timi["loss"]) == 3 and base["loss"] == []
    assert all(0 <= r["purity"] <= 1 and 0.5 <= r["selectivity"] <= 1 for r in base["layers"])
    opt = optimise_latent(pipe, image, masks, steps=4, layers=2)
    assert opt["loss"][-1] < opt["loss"][0]  # plain gradient steps lower Eq.4
    row = {"scene": "s@seed0", "k": 2, "base": base, "timi": timi, "opt_eq4": opt, "opt_normalised": opt}
    assert "P normalised over instances" in summarise([row])


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 40), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_gradient_shares_are_the_anova_decomposition(L, C, K, seed):
    """between + within = total (one-way ANOVA over the instance groups); a common shift is all
    'common', a gradient constant per group is all 'between' minus the common part."""
    from timi.testbed.gradient import shares

    rng = np.random.default_rng(seed)
    g = torch.from_numpy(rng.normal(size=(L, C)))
    labels = torch.from_numpy(rng.integers(0, K, size=L))
    common, between = shares(g, labels)
    within = sum(float(((g[labels == k] - g[labels == k].mean(0)) ** 2).sum()) for k in labels.unique())
    assert between + within / float((g ** 2).sum()) == pytest.approx(1.0 - common, abs=1e-9)
    perm = torch.from_numpy(rng.permutation(L))
    assert shares(g[perm], labels[perm]) == pytest.approx((common, between), abs=1e-12)
    shift = torch.from_numpy(rng.normal(size=(1, C))).expand(L, C)
    assert shares(shift, labels) == pytest.approx((1.0, 0.0), abs=1e-9)
    per_group = torch.from_numpy(rng.normal(size=(K, C)))[labels]
    c2, b2 = shares(per_group, labels)
    assert c2 + b2 == pytest.approx(1.0, abs=1e-9)


def test_gradient_structure_on_a_tiny_model(fast_base):
    from timi.testbed.gradient import gradient_markdown, gradient_structure
    from timi_core import TIMIConfig
    from timi_torch import TIMIPipeline

    pipe = TIMIPipeline(fast_base)
    image, masks = scene()
    rows = []
    for i in range(2):
        out = {name: gradient_structure(pipe, image, masks, cfg, seed=i)
               for name, cfg in (("paper", TIMIConfig.paper(guided_layers=2)),
                                 ("normalised", TIMIConfig.paper(guided_layers=2, normalize_instances=True)),
                                 ("removed", TIMIConfig.paper(guided_layers=2, common="remove")))}
        for r in out.values():
            assert 0.0 <= r["common"] <= 1.0 and 0.0 <= r["between"] <= 1.0 - r["common"] + 1e-9
        # the paper's step is its smoothed gradient; removing the token mean leaves the between-instance
        # energy (deviations from that mean) and drops the common energy: share / (1 - common share)
        paper, removed = out["paper"], out["removed"]
        assert paper["common_step"] == pytest.approx(paper["common_smoothed"])
        assert removed["common_step"] == pytest.approx(0.0, abs=1e-9)
        assert removed["between_step"] == pytest.approx(paper["between_smoothed"] / (1 - paper["common_smoothed"]), rel=1e-6)
        rows.append({"scene": f"s{i}", **out})
    assert rows[0]["paper"] != rows[0]["normalised"]
    text = gradient_markdown(rows, "paper")
    assert "| normalised |" in text and "2 scenes" in text
