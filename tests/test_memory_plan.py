"""The dry run's memory plan: model states against a hand count at LLaMA-7B's real shapes (built on the meta
device, no weights), DeepSpeed's own estimators agreeing with our split, and the activation count against the
tensors autograd really keeps on a tiny model."""

import pytest
import torch

from memvp_ds import ConfigError, build_model, load_config
from memvp_ds.engine.memory_plan import (GIB, MicroBatch, ZeroSetup, memory_plan, model_shape, model_states,
                                         parse_memory_size, saved_activations)
from tests.conftest import CONFIGS, tiny_config

LLAMA1_7B = ("model.llm.config={model_type: llama, hidden_size: 4096, intermediate_size: 11008, "
             "num_hidden_layers: 32, num_attention_heads: 32, vocab_size: 32000}")


def _7b(*extra):
    return load_config(str(CONFIGS / "memvp_llama7b_sqa.yaml"), ["model.llm.path=null", LLAMA1_7B, *extra])


def _hand_counted_7b():
    d, f, layers, vocab = 4096, 11008, 32, 32000
    block = 4 * d * d + 3 * d * f + 2 * d  # q, k, v, o; gate, up, down; two RMSNorm weights
    frozen = 2 * vocab * d + layers * block + d  # embedding, LM head (untied), blocks, final norm
    trainable = (1024 * 128 + 128) + (128 * d + d) + 2 * 320 * d  # projector 1024 -> 128 -> d; P1, P2 of 320 rows
    return frozen, trainable, block, vocab * d


def test_model_states_of_llama_7b_on_8_ranks_are_the_hand_count():
    frozen, trainable, block, embedding = _hand_counted_7b()
    assert (frozen, trainable) == (6_738_415_616, 3_281_024)
    plan = memory_plan(_7b(), {"zero_optimization": {"stage": 2}}, world_size=8)
    assert plan["parameters"] == {"frozen": frozen, "trainable": trainable}
    states = plan["per_rank_bytes"]
    # ZeRO-2, bf16: frozen and trainable 16-bit weights on every rank; gradients (16-bit + fp32), fp32 master
    # weights and Adam moments split over the 8 ranks.
    assert states["frozen_weights"] == 2 * frozen
    assert states["trainable_weights"] == 2 * trainable
    assert states["gradients"] == 6 * trainable // 8
    assert states["optimizer_states"] == 12 * trainable // 8
    assert states["zero3_gathered"] == 0
    ours, deepspeed = plan["trainable_states_bytes"].values()
    assert deepspeed == 2 * trainable + 18 * trainable // 8 and abs(ours - deepspeed) <= 1

    plan3 = memory_plan(_7b(), {"zero_optimization": {"stage": 3}}, world_size=8)
    states3 = plan3["per_rank_bytes"]
    assert states3["frozen_weights"] == 2 * frozen // 8
    assert states3["trainable_weights"] == 2 * trainable // 8
    # a decoder block (a leaf, gathered whole: 202M parameters) is the largest unit, above the 131M embedding
    assert block > embedding and states3["zero3_gathered"] == 2 * 2 * block
    ours, deepspeed = plan3["trainable_states_bytes"].values()
    assert abs(ours - deepspeed) <= 2  # DeepSpeed: 4 x largest trainable layer (P1) + 18 x trainable / ranks

    offloaded = memory_plan(_7b(), {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, 8)
    assert offloaded["trainable_states_bytes"] == {"ours": 2 * trainable, "deepspeed_estimator": 2 * trainable}


def test_quantised_frozen_weights():
    """model.llm.quantization: the decoder blocks' linear weights in 1 byte (8bit) or 9/16 byte (4bit: NF4 half
    a byte plus an fp32 scale per 64), the embedding, LM head and norms in bf16; one GPU."""
    frozen = _hand_counted_7b()[0]
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    shape = model_shape(_7b().model)
    assert shape.quantizable_params == linear
    single = ZeroSetup(stage=2, world_size=1, offload_optimizer=False, offload_param=False)
    assert model_states(shape, single, 2, "8bit")["frozen_weights"] == 2 * (frozen - linear) + linear
    assert model_states(shape, single, 2, "4bit")["frozen_weights"] == 2 * (frozen - linear) + linear * 9 // 16
    assert model_states(shape, single, 2)["frozen_weights"] == 2 * frozen


def test_activations_at_real_shapes_and_the_verdict():
    cfg = _7b()  # 4 samples x 512 positions, bf16
    p, d, f, heads, e, rows, vocab = 4 * 512, 4096, 11008, 32, 128, 320, 32000
    block = p * (2 * (4 * d + 4) + 2 * (4 * heads * e) + 4 * heads + 3 * 2 * f)
    memory_term = p * 2 * (d + 3 * rows)
    outside = 2 * p * e * 2 + 4 * 256 * (1024 + 256) * 2 + p * (4 * d + 4) + p * 4 * vocab + 2 * 4 * rows * d * 2
    plan = memory_plan(cfg, {"zero_optimization": {"stage": 2}}, 8, gpu_memory=parse_memory_size("80GiB"))
    acts = plan["per_rank_bytes"]
    assert acts["activations"] == 31 * (block + memory_term) + memory_term + outside
    assert acts["activations_checkpointed"] == 32 * p * d * 2 + outside + block + memory_term
    states = sum(v for k, v in acts.items() if k not in ("activations", "activations_checkpointed"))
    total = states + acts["activations"]
    assert plan["total_gib"]["without_checkpointing"] == round(total / GIB, 2)
    assert plan["verdict"].startswith("fits: ")
    tight = memory_plan(cfg, {"zero_optimization": {"stage": 2}}, 8, gpu_memory=parse_memory_size("20GiB"))
    assert tight["verdict"].startswith("does not fit: ") and "gradient_checkpointing=true" in tight["verdict"]


@pytest.mark.parametrize("strategy,dtype,checkpointing", [
    ("memvp", torch.float32, False), ("memvp", torch.bfloat16, False), ("memvp", torch.bfloat16, True),
    ("input_prefix", torch.float32, False), ("input_prefix", torch.bfloat16, False)])
def test_activation_count_matches_what_autograd_keeps(strategy, dtype, checkpointing):
    """Every tensor autograd saves in a forward with loss (parameters excluded, shared storage once) of a
    4-layer tiny model cast whole to ``dtype`` as DeepSpeed does, plus MemVP's K and V, which the strategy
    keeps for the step. The count's only slack is the loss, counted at every position (here the first
    position of each row has no label) and RoPE's cos/sin, which a checkpointed block hides inside."""
    cfg = tiny_config(strategy, "model.llm.config.num_hidden_layers=4")
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dtype).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    samples, length = 2, 40
    ids = torch.randint(5, 500, (samples, length))
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(ids, labels=ids, image_features=torch.randn(samples, 16, 32, dtype=dtype),
              has_image=torch.ones(samples, dtype=torch.bool))
    if strategy == "memvp":
        for tensor in (model.strategy._keys, model.strategy._values):
            saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
    measured = sum(saved.values())
    shape = model_shape(cfg.model)
    batch = MicroBatch(samples, samples * length, samples * (length + shape.prefix_positions), 16, 32,
                       cfg.model.projector.hidden_dim)
    counted = saved_activations(shape, batch, dtype.itemsize, checkpointing)
    slack = samples * 4 * 512 + (2 * batch.positions * 16 * dtype.itemsize if checkpointing else 0)
    assert 0 <= counted - measured <= slack, (counted, measured)


def test_bad_gpu_memory_is_one_error_line():
    assert parse_memory_size("80GiB") == 80 * GIB and parse_memory_size("141GB") == 141 * 10**9
    with pytest.raises(ConfigError, match="--gpu-memory: '80 gigs' is not a memory size"):
        parse_memory_size("80 gigs")


def test_zero_setup_reads_offload():
    setup = ZeroSetup.from_ds_config({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, 4)
    assert (setup.stage, setup.offload_param, setup.offload_optimizer) == (3, True, False)


def test_gpu_memory_errors_are_one_line_before_any_work(capsys):
    from memvp_ds.train import main

    assert main(["--config", "tiny_memvp", "--gpu-memory", "80GiB"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpu-memory is for --dry-run's memory estimate; add --dry-run"
    assert main(["--config", "tiny_memvp", "--dry-run", "--gpu-memory", "lots"]) == 2
    assert "error: --gpu-memory: 'lots' is not a memory size" in capsys.readouterr().err
