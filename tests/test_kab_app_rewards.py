"""KAB-APP's rewards as the official DVP-SQA code computes them (engine.py kab_update_step): each drawn arm is
one held-out forward in training mode, dropout on, r = 100 exp(-CE), step 10 pi (1 - pi); the eval-mode
form (one forward per distinct arm, dropout off) stays as search.dvp.reward_mode=eval."""

import math

import pytest
import torch

from memvp_ds import ConfigError, build_model
from memvp_ds.search.dvp import DVPLayerSearch, kab_app_update
from tests.conftest import tiny_config


def _search_and_loss(*overrides):
    """The tiny DVP model searching over both layers, and its real held-out loss on one fixed batch, each call
    recorded as (active layer, dropout, loss)."""
    cfg = tiny_config("dvp", "train.mode=dvp_search", "model.dvp.layer=null", "search.dvp.arms=6", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (4, 12), generator=g)
    feats = torch.randn(4, cfg.model.visual_tokens, cfg.model.visual_dim, generator=g)
    labels = ids.masked_fill(torch.arange(12)[None] < 8, -100)
    calls = []

    @torch.no_grad()
    def heldout_loss(update, dropout=False):
        was_training = model.training
        model.train(dropout)
        loss = model(ids, labels=labels, image_features=feats).loss.item()
        model.train(was_training)
        calls.append((model.strategy.active_layer, dropout, loss))
        return loss

    return cfg, DVPLayerSearch(model.strategy, cfg.search.dvp, seed=0), heldout_loss, calls


def test_defaults_are_the_official_step_and_train_mode_rewards():
    cfg, search, heldout_loss, calls = _search_and_loss()
    assert (cfg.search.dvp.eta, cfg.search.dvp.reward_mode) == (10.0, "train")
    search.after_step(1, heldout_loss)
    entry = search.history[-1]
    # One forward per draw, all with dropout, each draw's own reward: repeated arms differ (dropout 0.1).
    assert len(calls) == len(entry["arms"]) == 6
    assert all(dropout for _, dropout, _ in calls)
    assert [layer for layer, _, _ in calls] == entry["arms"]
    assert entry["rewards"] == pytest.approx([100 * math.exp(-loss) for _, _, loss in calls], rel=1e-12)
    repeated = [i for i, a in enumerate(entry["arms"]) if entry["arms"].index(a) != i]
    assert repeated and any(entry["rewards"][i] != entry["rewards"][entry["arms"].index(entry["arms"][i])]
                            for i in repeated)
    expected = kab_app_update(torch.zeros(2, dtype=torch.float64), entry["arms"], entry["rewards"], 10.0)
    assert search.preferences.tolist() == pytest.approx(expected.tolist(), abs=1e-12)


def test_eval_mode_scores_each_distinct_arm_once_without_dropout():
    _, search, heldout_loss, calls = _search_and_loss("search.dvp.reward_mode=eval", "search.dvp.eta=0.1")
    search.after_step(1, heldout_loss)
    entry = search.history[-1]
    assert sorted(layer for layer, _, _ in calls) == sorted(set(entry["arms"]))
    assert not any(dropout for _, dropout, _ in calls)
    by_layer = {layer: 100 * math.exp(-loss) for layer, _, loss in calls}
    assert entry["rewards"] == pytest.approx([by_layer[a] for a in entry["arms"]], rel=1e-12)
    expected = kab_app_update(torch.zeros(2, dtype=torch.float64), entry["arms"], entry["rewards"], 0.1)
    assert search.preferences.tolist() == pytest.approx(expected.tolist(), abs=1e-12)


def test_unknown_reward_mode_is_refused():
    with pytest.raises(ConfigError, match="search.dvp.reward_mode"):
        tiny_config("dvp", "search.dvp.reward_mode=noisy")
