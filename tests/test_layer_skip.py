"""DAS layer skipping: skipped layers are really not computed, and what replaces them is h + A(norm(h))."""

import pytest
import torch
from torch.nn import functional as F

from memvp_ds.config import ConfigError
from memvp_ds.engine.metrics import MatmulFlopCounter, attention_flops_per_position
from tests.conftest import tiny_config, tiny_model

N, C = 16, 32


def _count_calls(modules):
    counts = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("form", ["llava", "bottleneck"])
def test_skipped_layer_equals_adapter_on_the_normalised_input(form):
    """LLaVA-DAS (DoubtedSteam/DAS, llava/train/das_adapter.py): h + n + up(ReLU(down n)), the default on a
    plain LLM; this project's earlier bottleneck: h + up(SiLU(down n)); n = input_layernorm(h)."""
    model = tiny_model("memvp", "model.skip.layers=[0]", f"model.skip.adapter={form}").eval()
    adapter = model.llm.model.layers[0].adapter
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ids, feats = torch.randint(4, 512, (2, 7)), torch.randn(2, N, C)
    reference_model = tiny_model("memvp").eval()  # same seeds: identical LLM and strategy weights
    llm = reference_model.llm
    with torch.no_grad():
        ours = model(ids, image_features=feats).logits
        norm = llm.model.layers[0].input_layernorm

        def replace_layer(module, args, kwargs, output):
            h = args[0]
            if form == "llava":
                return h + norm(h) + adapter.up(F.relu(adapter.down(norm(h))))
            return h + adapter.up(F.silu(adapter.down(norm(h))))

        llm.model.layers[0].register_forward_hook(replace_layer, with_kwargs=True)
        expected = reference_model(ids, image_features=feats).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_skipped_layers_are_not_computed_in_training_generation_or_the_cache():
    model = tiny_model("memvp", "model.skip.layers=[0]")
    layers = model.llm.model.layers
    assert layers[0].layer is None, "the final model drops a skipped layer's weights"
    mlp_calls = _count_calls([layers[1].mlp])
    ids = torch.randint(4, 512, (2, 6))
    model(ids, labels=ids, image_features=torch.randn(2, N, C)).loss.backward()
    assert mlp_calls == [1]
    generated = model.eval().generate(ids, image_features=torch.randn(2, N, C), max_new_tokens=3)
    assert generated.shape == (2, 3) and mlp_calls == [4]  # prefill + 2 decode steps, layer 1 only
    assert layers[1].self_attn.layer_idx == 0, "cache slot 0 belongs to the first computed layer"
    ids, feats = torch.randint(4, 512, (2, 32)), torch.randn(2, N, C)

    def step_flops(m):
        counter = MatmulFlopCounter(m)
        with torch.no_grad(), counter.counting():
            m.train()(ids, labels=ids, image_features=feats)
        return counter.take() + attention_flops_per_position(m, 32) * ids.numel()

    plain = tiny_model("memvp")
    frozen_matmuls = sum(p.numel() for n, p in plain.llm.model.layers[0].named_parameters() if p.dim() == 2)
    width, adapter = 64, sum(p.numel() for p in layers[0].adapter.parameters() if p.dim() == 2)
    memory = 4 * width * 24  # MemVP's per-layer term, M = 24
    # Saved at every position: the layer's frozen matmuls, its attention and memory terms; added: the
    # adapter's trainable matmuls.
    saved = ids.numel() * (4 * frozen_matmuls + 3 * (4 * width * 32 + memory) - 6 * adapter)
    assert step_flops(plain) - step_flops(model) == pytest.approx(saved, rel=1e-9)


def test_search_model_toggles_layers_and_renumbers_the_cache():
    model = tiny_model("memvp", "train.mode=das_search", "data.val_shards=x")
    assert model.skipping is None, "tiny_model builds without search candidates"
    from memvp_ds.model import build_model

    cfg = tiny_config("memvp")
    torch.manual_seed(0)
    model = build_model(cfg.model, skippable=[0, 1]).eval()
    calls = _count_calls([model.llm.model.layers[i].layer.mlp for i in (0, 1)])
    ids = torch.randint(4, 512, (1, 5))
    for skipped, expected_calls in (([0], [0, 1]), ([1], [1, 1]), ([], [2, 2])):
        model.skipping.set_skipped(skipped)
        model.generate(ids, max_new_tokens=1)
        assert calls == expected_calls, skipped
    model.skipping.set_skipped([1])
    assert model.llm.model.layers[0].layer.self_attn.layer_idx == 0
    with pytest.raises(ValueError, match="at least one"):
        model.skipping.set_skipped([0, 1])


def test_bad_skip_lists_name_the_option():
    with pytest.raises(ConfigError, match="out of range"):
        tiny_model("memvp", "model.skip.layers=[5]")
    with pytest.raises(ConfigError, match="model.skip.layers"):
        tiny_config("memvp", "model.skip.layers=[1,1]")
    with pytest.raises(ConfigError, match="prompt's layer must run"):
        tiny_config("dvp", "model.skip.layers=[1]")
    with pytest.raises(ConfigError, match="search.json"):
        tiny_config("memvp", "model.skip.from_search=/nonexistent")
