"""GPU checks (``pytest -m gpu`` on a CUDA machine; skipped elsewhere): the model's numerics in bf16 on the
device against fp32 on the CPU, and cached generation on the device against full forwards."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model
from tests.test_packing import CASE_IDS, STRATEGY_CASES

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("strategy", ["memvp", "input_prefix", "apt"])
def test_bf16_forward_on_gpu_matches_fp32_on_cpu(strategy):
    cpu = tiny_model(strategy)
    gpu = tiny_model(strategy, "model.llm.dtype=bfloat16").cuda()
    gpu.load_trainable({k: v.cuda() for k, v in cpu.trainable_state_dict().items()})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (2, 24), generator=g)
    feats = torch.randn(2, 16, 32, generator=g)
    has_image = torch.tensor([True, False])
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        want = cpu(ids, image_features=feats, has_image=has_image).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = gpu(ids.cuda(), image_features=feats.cuda(), has_image=has_image.cuda()).logits.float().cpu()
    assert torch.allclose(got, want, atol=0.1, rtol=0.05), (got - want).abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_cached_generation_on_gpu_equals_full_forwards():
    model = tiny_model("memvp").cuda().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 512, (2, 10), generator=g).cuda()
    feats = torch.randn(2, 16, 32, generator=g).cuda()
    tokens = model.generate(ids, image_features=feats, max_new_tokens=6)
    sequence = ids
    for step in range(6):
        with torch.no_grad():
            logits = model(sequence, image_features=feats).logits
        assert torch.equal(logits[:, -1].argmax(-1), tokens[:, step])
        sequence = torch.cat([sequence, tokens[:, step : step + 1]], dim=1)


@pytest.mark.parametrize("strategy", ["memvp", "input_prefix", "apt"])  # DVP's token refuses flash attention
def test_packed_rows_with_flash_attention_equal_padded_batches(strategy):
    """flash_attention_2 runs packed rows as one varlen sequence (position-id resets): per-sample logits and
    the loss equal the padded sdpa batch's (bf16 tolerance)."""
    pytest.importorskip("flash_attn")
    from memvp_ds.data.collate import collate, pack
    from tests.test_packing import PAD, N, C, _run, _samples, _text_logits

    samples = _samples()
    models = [tiny_model(strategy, "model.llm.dtype=bfloat16", f"model.llm.attn_implementation={attn}").cuda().eval()
              for attn in ("sdpa", "flash_attention_2")]
    models[1].load_trainable(models[0].trainable_state_dict())
    slots = models[0].strategy.prefix_positions()
    batches = [collate(samples, PAD, (N, C)), pack(samples, PAD, (N, C), max_seq_len=64, visual_positions=slots)]
    outputs = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for model, batch in zip(models, batches):
            batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
            out = _run(model, batch)
            outputs.append((out.loss.float().cpu(), [l.float().cpu() for l in _text_logits(out, batch, samples)]))
    (loss_a, logits_a), (loss_b, logits_b) = outputs
    for a, b in zip(logits_a, logits_b):
        assert torch.allclose(b, a, atol=0.05, rtol=0.05), (b - a).abs().max()
    assert torch.allclose(loss_b, loss_a, atol=0.02)


FLEX_CASES = [(s, o, i) for (s, o), i in zip(STRATEGY_CASES, CASE_IDS) if i != "dvp"]  # DVP's token needs a backend that takes its per-layer mask (sdpa, eager)


@pytest.mark.parametrize("strategy,overrides,case", FLEX_CASES, ids=[c for _, _, c in FLEX_CASES])
def test_packed_rows_with_flex_attention_equal_padded_batches(strategy, overrides, case):
    """flex_attention (no extra package) runs packed rows with a block mask that transformers builds from the
    position-id resets: per-sample logits, the loss and the trainable gradients equal the padded sdpa batch's
    (fp32 on the GPU, so the tolerance is tight)."""
    from memvp_ds.data.collate import collate, pack
    from tests.test_packing import PAD, N, C, _model, _run, _samples, _text_logits

    samples = _samples()
    models = [_model(strategy, overrides, attn=attn).cuda().train() for attn in ("sdpa", "flex_attention")]
    models[1].load_trainable(models[0].trainable_state_dict())
    slots = models[0].strategy.prefix_positions()
    batches = [collate(samples, PAD, (N, C)), pack(samples, PAD, (N, C), max_seq_len=64, visual_positions=slots)]
    results = []
    for model, batch in zip(models, batches):
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        torch.manual_seed(0)
        out = _run(model, batch)
        out.loss.backward()
        grads = {n: p.grad.cpu() for n, p in model.trainable_parameters().items()}
        results.append((out.loss.detach().cpu(), [l.detach().cpu() for l in _text_logits(out, batch, samples)], grads))
    (loss_a, logits_a, grads_a), (loss_b, logits_b, grads_b) = results
    for a, b in zip(logits_a, logits_b):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-4, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantised_frozen_llm_runs_and_trains_with_zero2(bits, dataset, tmp_path):
    """model.llm.quantization: a tiny LLaMA saved as a model folder loads with bitsandbytes' quantised linear
    layers in its blocks (the LM head stays bf16), its logits follow the bf16 model's, the trainable tensors
    get finite gradients through the quantised blocks, and memvp-train runs it with ZeRO-2 to the end."""
    pytest.importorskip("bitsandbytes")
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from memvp_ds import build_model
    from tests.conftest import tiny_config
    from tests.helpers import run_train, scalars, train_overrides

    inline = dict(tiny_config("memvp").model.llm.config)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(inline.pop("model_type"), **inline)).save_pretrained(
        tmp_path / "llm")
    folder = [f"model.llm.path={tmp_path / 'llm'}", "model.llm.config=null", "model.llm.dtype=bfloat16"]
    plain = build_model(tiny_config("memvp", *folder).model).cuda().eval()
    torch.manual_seed(0)
    quantised = build_model(tiny_config("memvp", *folder, f"model.llm.quantization={bits}").model).cuda().eval()
    quantised.load_trainable(plain.trainable_state_dict())
    layer = quantised.llm.base_model.layers[0].mlp.up_proj
    assert type(layer).__name__ == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[bits]
    assert quantised.llm.get_output_embeddings().weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (2, 24), generator=g).cuda()
    feats = torch.randn(2, 16, 32, generator=g).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = plain(ids, image_features=feats).logits.float()
        got = quantised(ids, image_features=feats).logits.float()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8, (got - want).abs().max()
    quantised.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = quantised(ids, labels=ids, image_features=feats).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in quantised.trainable_parameters().values())

    out = tmp_path / "run"
    run_train(train_overrides(dataset, out, *folder, f"model.llm.quantization={bits}", "train.precision=bf16",
                              "train.max_steps=4", "train.ds_config=zero2"), timeout=300)
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert all(torch.isfinite(torch.tensor(v)) for v in scalars(out, "train/loss").values())
