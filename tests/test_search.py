"""DVP's KAB-APP and DAS's skip search: update rules by hand, and 2-rank searches that agree and resume exactly."""

import json
import math

import pytest
import torch

from memvp_ds.export import load_exported
from memvp_ds.search.base import step_generator
from memvp_ds.search.das import DASSearchOptions, das_score_update, sample_skip_set
from memvp_ds.search.dvp import kab_app_update
from tests.helpers import run_train, scalars, train_overrides



def test_kab_app_update_by_hand():
    # pi = 1/3 each, so pi (1 - pi) = 2/9; mean reward 85; arm 0 drawn twice (rewards 90 and 85), arm 2 once (80).
    updated = kab_app_update(torch.zeros(3, dtype=torch.float64), [0, 2, 0], [90.0, 80.0, 85.0], eta=0.5)
    expected = [0.5 * (5 + 0) * 2 / 9, 0.0, 0.5 * -5 * 2 / 9]
    assert updated.tolist() == pytest.approx(expected, abs=1e-12)


def test_das_score_update_by_hand():
    scores = torch.tensor([0.0, 0.0, math.log(3)], dtype=torch.float64)  # p = 0.5, 0.5, 0.75
    updated = das_score_update(scores, [[0, 2], [1]], [0.9, 0.7], eta=10.0)  # mean reward 0.8
    expected = [10 * 0.1 * 0.25, 10 * -0.1 * 0.25, math.log(3) + 10 * 0.1 * 0.75 * 0.25]
    assert updated.tolist() == pytest.approx(expected, abs=1e-12)


def test_skip_sets_are_distinct_repeatable_and_follow_p():
    p = torch.tensor([0.9, 0.1, 0.5, 0.5], dtype=torch.float64)
    draws = [sample_skip_set(p, 2, step_generator(0, step, 2)) for step in range(2000)]
    assert all(len(set(d)) == 2 and d == sorted(d) for d in draws)
    assert draws == [sample_skip_set(p, 2, step_generator(0, step, 2)) for step in range(2000)], "repeatable"
    counts = [sum(i in d for d in draws) for i in range(4)]
    assert counts[0] > counts[2] > counts[1] and abs(counts[2] - counts[3]) < 150


def test_heldout_batches_rotate_over_the_whole_share_in_a_new_order_each_pass():
    from memvp_ds.search.base import heldout_batch_index

    picks = [heldout_batch_index(update, 5, seed=3) for update in range(20)]
    passes = [picks[i : i + 5] for i in range(0, 20, 5)]
    assert all(sorted(p) == [0, 1, 2, 3, 4] for p in passes), "every pass visits every batch once"
    assert len({tuple(p) for p in passes}) > 1, "passes are drawn in different orders"
    assert picks == [heldout_batch_index(update, 5, seed=3) for update in range(20)], "a function of the update alone"
    assert picks != [heldout_batch_index(update, 5, seed=4) for update in range(20)]
    assert {heldout_batch_index(u, 1, seed=0) for u in range(4)} == {0}


def test_das_warmup_defaults_to_half_of_the_run():
    from memvp_ds.search.das import LayerSkipSearch

    class Skipping:
        layers, wrapped, skipped = [0, 1, 2], [0, 1, 2], []

        def set_skipped(self, layers):
            self.skipped = list(layers)

    def updates(options, total_steps):
        search = LayerSkipSearch(Skipping(), options, seed=0, total_steps=total_steps)
        scored = []
        for step in range(1, total_steps + 1):
            search.after_step(step, lambda update: scored.append((step, update)) or 1.0)
        return sorted({step for step, _ in scored}), search

    steps, search = updates(DASSearchOptions(skip=1, turn=2), total_steps=20)
    assert search.warmup_steps == 10 and steps == [12, 14, 16, 18, 20]
    steps, _ = updates(DASSearchOptions(skip=1, turn=2, warmup_steps=0), total_steps=20)
    assert steps == list(range(2, 21, 2))


def _search(dataset, out, mode, *extra, ranks=2, config="tiny_memvp"):
    overrides = train_overrides(dataset, out, f"train.mode={mode}", "train.max_steps=12", "train.save_interval=6",
                                *extra)
    run_train(overrides, ranks=ranks, config=config)
    return json.loads((out / "search.json").read_text())


def _assert_same_search(a, b, keys):
    for key in keys:
        assert a[key] == b[key], key
    assert a["history"] == b["history"]


@pytest.mark.slow
def test_das_search_on_two_zero3_ranks_agrees_resumes_exactly_and_feeds_the_final_run(dataset, tmp_path):
    common = ("search.das.turn=2", "search.das.warmup_steps=2", "search.das.subsets=2",
              "train.ds_config=zero3")
    result = _search(dataset, tmp_path / "search", "das_search", *common)
    assert len(set(result["choice_digest_per_rank"])) == 1, "both ranks skipped the same layers at every step"
    assert [h["step"] for h in result["history"]] == [4, 6, 8, 10, 12]
    p = result["probabilities"]
    assert result["skip_layers"] == [max(range(2), key=lambda i: p[i])]
    # The last update follows the rule from the one before it (the history holds the inputs).
    before, last = result["history"][-2]["probabilities"], result["history"][-1]
    scores = torch.tensor([math.log(q / (1 - q)) for q in before], dtype=torch.float64)
    expected = das_score_update(scores, last["subsets"], last["rewards"], 10.0)
    assert torch.sigmoid(expected).tolist() == pytest.approx(p, abs=1e-9)
    logged = scalars(tmp_path / "search", "search/p_skip_layer0")
    assert sorted(logged) == [4, 6, 8, 10, 12] and logged[12] == pytest.approx(p[0], abs=1e-6)

    resumed = _search(dataset, tmp_path / "resumed", "das_search", *common,
                      f"train.resume={tmp_path / 'search' / 'checkpoints' / 'step-00000006'}")
    _assert_same_search(resumed, result, ("skip_layers", "scores", "probabilities"))

    final = tmp_path / "final"
    run_train(train_overrides(dataset, final, f"model.skip.from_search={tmp_path / 'search'}", "train.max_steps=3",
                              "eval.max_samples=4"))
    model, cfg = load_exported(str(final / "export" / "trainable.safetensors"))
    assert cfg.model.skip.layers == result["skip_layers"]
    skipped = result["skip_layers"][0]
    assert model.llm.model.layers[skipped].layer is None
    assert any(f"layers.{skipped}.adapter." in name for name in model.trainable_parameters())


@pytest.mark.slow
def test_dvp_search_on_two_zero3_ranks_with_checkpointing_resumes_exactly_and_logs_the_policy(dataset, tmp_path):
    """DVP as a token (per-layer masks, adapters, packed batches) on 2 ZeRO-3 ranks with gradient
    checkpointing: the blocks' recomputation in backward sees the same slot masks and prompt. The official
    adapter width d / 64 = 1 gives one-element tensors, which the resume restores across the 2 partitions."""
    common = ("model.dvp.layer=null", "search.dvp.arms=3", "search.dvp.interval=3", "search.dvp.eta=1.0",
              "train.ds_config=zero3", "train.gradient_checkpointing=true", "model.dvp.adapter_reduction=64")
    result = _search(dataset, tmp_path / "search", "dvp_search", *common, config="tiny_dvp")
    assert len(set(result["choice_digest_per_rank"])) == 1
    assert [h["step"] for h in result["history"]] == [3, 6, 9, 12]
    assert result["dvp_layer"] == result["candidates"][max(range(2), key=lambda i: result["policy"][i])]
    logits = torch.zeros(2, dtype=torch.float64)
    for entry in result["history"]:  # replay every update from the recorded arms and rewards
        logits = kab_app_update(logits, [result["candidates"].index(a) for a in entry["arms"]], entry["rewards"], 1.0)
    assert logits.tolist() == pytest.approx(result["logits"], abs=1e-12)
    assert sorted(scalars(tmp_path / "search", "search/pi_layer1")) == [3, 6, 9, 12]

    resume = f"train.resume={tmp_path / 'search' / 'checkpoints' / 'step-00000006'}"
    resumed = _search(dataset, tmp_path / "resumed", "dvp_search", *common, resume, config="tiny_dvp")
    _assert_same_search(resumed, result, ("dvp_layer", "logits", "policy"))


def test_a_search_refuses_zero3_with_an_offloaded_optimizer(tmp_path):
    """DeepSpeed's offloaded stage-3 optimizer would re-apply stale gradients to the tensors a search step
    leaves unused (memvp_ds/engine/zero3_gradients.py clears them only without offload)."""
    import json as _json

    from memvp_ds import ConfigError
    from memvp_ds.engine.deepspeed_config import build_ds_config
    from tests.conftest import tiny_config

    ds = tmp_path / "z3_offload_optimizer.json"
    ds.write_text(_json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    search = tiny_config("dvp", "train.mode=dvp_search", "model.dvp.layer=null", f"train.ds_config={ds}")
    with pytest.raises(ConfigError, match="offload_optimizer with train.mode=dvp_search"):
        build_ds_config(search, 1)
    assert build_ds_config(tiny_config("dvp", f"train.ds_config={ds}"), 1)["zero_optimization"]["stage"] == 3
    assert build_ds_config(tiny_config("dvp", "train.mode=dvp_search", "model.dvp.layer=null",
                                       "train.ds_config=zero3_offload"), 1)["zero_optimization"]["stage"] == 3


def test_ranks_that_disagree_stop_with_an_error_naming_the_step(monkeypatch):
    from memvp_ds.search import base
    from memvp_ds.search.das import LayerSkipSearch

    class Skipping:  # the search needs only the layer count and the candidates from it
        layers, wrapped, skipped = [0, 1, 2], [0, 1, 2], []

    search = LayerSkipSearch(Skipping(), DASSearchOptions(skip=1), seed=0, total_steps=10)
    monkeypatch.setattr(base, "all_gather_objects", lambda choice: [choice, [2]])
    with pytest.raises(RuntimeError, match="ranks chose different sub-networks at step 7"):
        search.check_agreement(7, [0])
    monkeypatch.setattr(base, "all_gather_objects", lambda choice: [choice, choice])
    search.check_agreement(8, [0])
    # The digest records the agreed choices: equal for the same sequence, different for another one.
    twin, other = (LayerSkipSearch(Skipping(), DASSearchOptions(skip=1), seed=0, total_steps=10) for _ in range(2))
    twin.check_agreement(8, [0])
    other.check_agreement(8, [1])
    assert twin.choice_digest() == search.choice_digest() != other.choice_digest()
