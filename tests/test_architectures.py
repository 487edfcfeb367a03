"""Other LLaMA-style decoders work; architectures without the pre-norm block get a clear error."""

import pytest
import torch

from memvp_ds import build_model, load_config
from memvp_ds.model.llm import UnsupportedArchitectureError, load_frozen_llm
from tests.conftest import CONFIGS

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)


def _config(model_type, **extra):
    inline = {"model_type": model_type, **SMALL, **extra}
    return load_config(str(CONFIGS / "tiny_memvp.yaml"), [f"model.llm.config={inline}"])


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_memvp_on_other_prenorm_decoders(model_type):
    cfg = _config(model_type, num_key_value_heads=2)
    model = build_model(cfg.model).eval()
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        plain = load_frozen_llm(cfg.model.llm)(input_ids=ids).logits
        assert torch.equal(model(ids).logits, plain)
        model.strategy.memory.memory_values.normal_()
        out = model(ids, image_features=torch.randn(2, 16, 32))
    assert not torch.allclose(out.logits, plain, atol=1e-4)
    assert model.generate(ids, max_new_tokens=3).shape == (2, 3)


@pytest.mark.parametrize(
    "model_type, extra, message",
    [
        ("gpt2", dict(n_embd=64, n_layer=2, n_head=4), "no 'layers' list"),
        ("gemma2", dict(head_dim=16, num_key_value_heads=2), "extra FFN norms"),
    ],
)
def test_unsupported_architectures_are_named(model_type, extra, message):
    inline = {"model_type": model_type, "vocab_size": 256, **extra}
    cfg = load_config(str(CONFIGS / "tiny_memvp.yaml"), [f"model.llm.config={inline}"])
    with pytest.raises(UnsupportedArchitectureError, match=message):
        build_model(cfg.model)
