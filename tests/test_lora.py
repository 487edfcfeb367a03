"""LoRA on the frozen LLM (model.lora, through peft) and the llava_lora strategy: the forward against the merged
weights W + (alpha / r) B A, the trainable set by name, the config rules, the export round trip and the
trainable count at LLaMA-7B shapes."""

import pytest
import torch

from memvp_ds import ConfigError, build_model, load_config
from memvp_ds.export import load_exported, write_export
from tests.conftest import CONFIGS, tiny_config, tiny_model

N, C = 16, 32
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
PROJECTOR = {"strategy.projector.fc1.weight", "strategy.projector.fc1.bias", "strategy.projector.fc2.weight",
             "strategy.projector.fc2.bias"}


def _lora_names(layers=2, targets=TARGETS):
    return {f"llm.model.layers.{i}.{t}.lora_{ab}.default.weight" for i in range(layers) for t in targets for ab in "AB"}


def _randomise(model, scale=0.1, seed=1):
    """Every trainable tensor non-trivial (LoRA's B starts at zero, which would hide a wrong forward)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_lora_forward_equals_the_frozen_model_with_merged_weights():
    """Independent computation: the same tiny model without LoRA (input_prefix with llava_lora's projector),
    each targeted Linear's weight replaced by W + (alpha / r) B A; dropout off."""
    model = tiny_model("llava_lora", "model.lora.dropout=0.0", "model.lora.alpha=12")
    _randomise(model)
    plain = tiny_model("input_prefix", "model.projector.hidden_dim=64", "model.projector.activation=gelu")
    plain.strategy.load_state_dict(model.strategy.state_dict())
    scale = 12 / 8  # alpha / rank (tiny_llava_lora.yaml: rank 8)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, linear in plain.llm.named_modules():
            if name.endswith(TARGETS):
                a, b = params[f"llm.{name}.lora_A.default.weight"], params[f"llm.{name}.lora_B.default.weight"]
                assert torch.equal(params[f"llm.{name}.base_layer.weight"], linear.weight), "same frozen W"
                linear.weight += scale * b @ a
    torch.manual_seed(2)
    ids, feats = torch.randint(4, 512, (3, 12)), torch.randn(3, N, C)
    has_image = torch.tensor([True, False, True])
    out = model(ids, labels=ids, image_features=feats, has_image=has_image)
    ref = plain(ids, labels=ids, image_features=feats, has_image=has_image)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    lora_off = tiny_model("input_prefix", "model.projector.hidden_dim=64", "model.projector.activation=gelu")
    lora_off.strategy.load_state_dict(model.strategy.state_dict())
    assert (out.logits - lora_off(ids, image_features=feats, has_image=has_image).logits).abs().max() > 1e-2, \
        "the LoRA term is not negligible, so the comparison above checks it"


def test_llava_lora_trains_only_lora_and_the_projector():
    model = tiny_model("llava_lora")
    assert set(model.trainable_parameters()) == _lora_names() | PROJECTOR
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(model.trainable_parameters())
    ids = torch.randint(4, 512, (2, 10))
    _randomise(model)
    model(ids, labels=ids, image_features=torch.randn(2, N, C)).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(model.trainable_parameters()), "every LoRA tensor and the projector get a gradient"


def test_lora_combines_with_memvp_and_is_off_by_default_elsewhere():
    plain = tiny_model("memvp")
    assert tiny_config("memvp").model.lora.enabled is None
    assert not any("lora" in name for name, _ in plain.named_parameters()), "no LoRA unless asked for"
    combined = tiny_model("memvp", "model.lora.enabled=true", "model.lora.rank=4")
    assert set(combined.trainable_parameters()) == set(plain.trainable_parameters()) | _lora_names()
    # Built in the same order, MemVP's own tensors start the same with or without LoRA.
    for name, p in plain.trainable_parameters().items():
        assert torch.equal(p, combined.trainable_parameters()[name]), name
    some = tiny_model("llava_lora", "model.lora.target_modules=[q_proj,v_proj]")
    assert set(some.trainable_parameters()) == _lora_names(targets=("self_attn.q_proj", "self_attn.v_proj")) | PROJECTOR


def test_lora_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="model.lora.enabled: strategy llava_lora"):
        tiny_config("llava_lora", "model.lora.enabled=false")
    with pytest.raises(ConfigError, match="model.lora.rank must be >= 1"):
        tiny_config("llava_lora", "model.lora.rank=0")
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        tiny_config("llava_lora", "model.lora.dropout=1.0")
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        tiny_config("llava_lora", "model.lora.target_modules=[all-linear,q_proj]")
    with pytest.raises(ConfigError, match="model.projector.activation: 'relu'"):
        tiny_config("llava_lora", "model.projector.activation=relu")
    with pytest.raises(ConfigError, match="model.lora.target_modules.*qq_proj"):
        build_model(tiny_config("llava_lora", "model.lora.target_modules=[qq_proj]").model)


def test_export_of_lora_weights_reloads_to_equal_outputs(tmp_path):
    cfg = tiny_config("llava_lora", "model.lora.dropout=0.0")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    _randomise(model)
    path = str(tmp_path / "export" / "trainable.safetensors")
    write_export({k: v.contiguous() for k, v in model.trainable_state_dict().items()}, path, cfg)
    torch.manual_seed(5)  # another random init: only the export makes the outputs equal
    reloaded, stored = load_exported(path)
    assert stored.model.strategy == "llava_lora" and stored.model.lora.rank == 8
    ids, feats = torch.randint(4, 512, (2, 10)), torch.randn(2, N, C)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, image_features=feats).logits, reloaded(ids, image_features=feats).logits)


LLAMA_7B = ("model.llm.config={model_type: llama, hidden_size: 4096, intermediate_size: 11008, "
            "num_hidden_layers: 32, num_attention_heads: 32, vocab_size: 32000}")


def test_trainable_count_at_llama_7b_shapes_on_the_meta_device():
    """LoRA r = 128 on q, k, v, o (4096 -> 4096) and gate, up (4096 -> 11008), down (11008 -> 4096) in 32
    layers, plus the mlp2x_gelu projector 1024 -> 4096 -> 4096 with biases."""
    cfg = load_config(str(CONFIGS / "llava_lora_llama7b_sqa.yaml"), ["model.llm.path=null", LLAMA_7B])
    with torch.device("meta"):
        model = build_model(cfg.model)
    counts = {"lora": 0, "projector": 0}
    for name, p in model.trainable_parameters().items():
        counts["lora" if ".lora_" in name else "projector"] += p.numel()
    r, d, ffn = 128, 4096, 11008
    assert counts["lora"] == 32 * r * (4 * (d + d) + 3 * (d + ffn)) == 319_815_680
    assert counts["projector"] == 1024 * d + d + d * d + d == 20_979_712
    print(f"llava_lora at LLaMA-7B shapes: {sum(counts.values()) / 1e6:.1f} M trainable "
          f"(LoRA {counts['lora'] / 1e6:.1f} M, projector {counts['projector'] / 1e6:.1f} M)")


@pytest.mark.parametrize("strategy,overrides", [("llava_lora", []), ("memvp", ["model.lora.enabled=true"])])
def test_lora_gradients_are_the_same_with_gradient_checkpointing(strategy, overrides):
    """Text-only rows included: there the first block's input (frozen embeddings) needs no gradient, and the
    LoRA gradients inside must still come out."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(strategy, "model.lora.dropout=0.0", "model.memvp.dropout=0.0", *overrides)
        _randomise(model)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        torch.manual_seed(3)
        ids, feats = torch.randint(4, 512, (2, 10)), torch.randn(2, N, C)
        model(ids, labels=ids, image_features=feats, has_image=torch.tensor([True, False])).loss.backward()
        model(ids, labels=ids).loss.backward()  # a text-only batch
        grads.append({name: p.grad for name, p in model.trainable_parameters().items()})
    assert all(g is not None for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
