"""The real entry point with real DeepSpeed engines: 2 CPU ranks (gloo) against single-process runs."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (REPO, assert_zero3_gradients_equal_plain_pytorch, free_port, run_train, scalars,
                           train_overrides)

pytestmark = pytest.mark.slow
STEPS = 12
# Dropout off where runs with different rank counts are compared: dropout masks are per-rank streams.
NO_DROPOUT = "model.memvp.dropout=0.0"


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """Runs shared by several tests (each launch costs ~20 s on two cores)."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    common = (f"train.max_steps={STEPS}", "train.save_interval=4", NO_DROPOUT, "logging.peak_tflops=1.0")
    # Same global batch and the same data streams: 2 ranks x 1 worker x accum 1 == 1 rank x 2 workers x accum 2.
    out["zero2_2ranks"] = base / "zero2_2ranks"
    # The README's launcher for this one; the others use torchrun (tests/helpers.py: run_train).
    run_train(train_overrides(dataset, out["zero2_2ranks"], *common, "train.ds_config=zero2"), ranks=2,
              launcher="deepspeed")
    out["single"] = base / "single"
    run_train(train_overrides(dataset, out["single"], *common, "data.num_workers=2", "train.grad_accum_steps=2"))
    out["zero2_2ranks_padded"] = base / "zero2_2ranks_padded"
    run_train(train_overrides(dataset, out["zero2_2ranks_padded"], *common, "train.ds_config=ds_configs/zero2.json",
                              "data.packing=false", "eval.max_samples=1"), ranks=2)
    out["zero3_2ranks_ckpt"] = base / "zero3_2ranks_ckpt"
    run_train(train_overrides(dataset, out["zero3_2ranks_ckpt"], *common, "train.ds_config=zero3",
                              "train.gradient_checkpointing=true"), ranks=2)
    return out


def _losses(out_dir):
    return [value for _, value in sorted(scalars(out_dir, "train/loss").items())]


def test_two_rank_zero2_matches_single_process_and_learns(runs):
    two, one = _losses(runs["zero2_2ranks"]), _losses(runs["single"])
    assert len(two) == len(one) == STEPS
    assert two == pytest.approx(one, rel=2e-4, abs=2e-4)
    assert sum(two[-3:]) / 3 < sum(two[:3]) / 3 - 0.3, f"loss did not go down: {two}"


def test_packing_is_on_by_default_and_trains_as_the_padded_run(runs):
    """The runs above pack (the default for memvp); the same 2-rank run with padded batches sees the same
    samples per step and the same per-token losses, so the first steps (weights updated through ZeRO-2 and
    Adam in between) agree to float summation order. Later steps are not compared: this tiny model's loss
    spikes around step 7 (gradient norm 4-7) and amplifies rounding differences to percents, as in the
    ZeRO-3 comparison below."""
    assert "packing: true" in (runs["zero2_2ranks"] / "config.yaml").read_text()
    packed, padded = _losses(runs["zero2_2ranks"]), _losses(runs["zero2_2ranks_padded"])
    assert len(packed) == len(padded) == STEPS
    assert packed[:4] == pytest.approx(padded[:4], rel=1e-5, abs=1e-5)
    # Same samples and text tokens per step: tokens per sample agree when samples (not packed rows) are counted.
    per_sample = [{step: scalars(runs[name], "train/tokens_per_s")[step] / rate
                   for step, rate in scalars(runs[name], "train/samples_per_s").items()}
                  for name in ("zero2_2ranks", "zero2_2ranks_padded")]
    assert per_sample[0] == pytest.approx(per_sample[1], rel=1e-6)


def test_two_rank_zero3_with_gradient_checkpointing_matches_single_process(runs):
    """ZeRO-3 reduce-scatters gradients in another order than a single process sums them. The rounding
    differences (~1e-7) are what Adam's normalised updates amplify step by step, so the first steps agree
    tightly and later ones stay close. (ZeRO-2 sums in the same order: it matches throughout, above.)"""
    three, one = _losses(runs["zero3_2ranks_ckpt"]), _losses(runs["single"])
    assert three[:4] == pytest.approx(one[:4], rel=1e-4, abs=1e-4)
    assert three == pytest.approx(one, rel=1e-2)


@pytest.mark.parametrize("config,trainable,tolerance", [("tiny_memvp", 6, 0.0), ("tiny_llava_lora", 32, 1e-6)])
def test_zero3_engine_gradients_equal_plain_pytorch_bit_for_bit(dataset, tmp_path, config, trainable, tolerance):
    """One micro-batch through a one-rank ZeRO-3 engine gives exactly the gradients plain PyTorch computes
    for the same model (torch's own F.linear, which ZeRO-3 replaces globally). ZeRO-3's per-module hooks
    reordered autograd's sums by the last bit, which Adam grew into percent-level loss differences within
    ten steps; frozen decoder blocks are now ZeRO-3 leaf modules (memvp_ds/engine/zero3_leaves.py). Blocks
    with LoRA tensors keep ZeRO-3's per-parameter gradient reduction and its per-module hooks: their
    gradients (checked here for every LoRA tensor, with LoRA's dropout off) equal PyTorch's to rounding."""
    overrides = train_overrides(dataset, tmp_path, NO_DROPOUT, "model.lora.dropout=0.0",
                                "train.ds_config=ds_configs/zero3.json")
    assert_zero3_gradients_equal_plain_pytorch(config, overrides, trainable, tolerance)


def test_zero3_gives_a_parameter_unused_in_a_step_a_zero_gradient():
    """A parameter without a gradient in a step (DVP's inactive generators, DAS's adapters of running layers)
    must move only by Adam's momentum, as in ZeRO-2 and a torch AdamW whose grads are zeroed. DeepSpeed's
    ZeRO-3 reused its last gradient instead; the trainer clears the buffer after each step
    (memvp_ds/engine/zero3_gradients.py). Reference: plain PyTorch on the same two-branch model."""
    script = """
import os
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="@PORT@", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import torch
import deepspeed
from memvp_ds.engine.zero3_gradients import clear_gradient_partitions

class TwoBranches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)

    def forward(self, x, use_b):
        return (self.a(x) + (self.b(x) if use_b else 0)).square().mean()

torch.manual_seed(0)
x = torch.arange(8.0).view(2, 4) / 8
plain, zero = TwoBranches(), TwoBranches()
zero.load_state_dict(plain.state_dict())
reference = torch.optim.AdamW(plain.parameters(), lr=0.1)
for use_b in (True, False):  # b gets a gradient in the first step only
    reference.zero_grad(set_to_none=False)
    plain(x, use_b).backward()
    reference.step()
deepspeed.init_distributed(dist_backend="gloo")
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=zero, optimizer=torch.optim.AdamW(zero.parameters(), lr=0.1), config=config)
for use_b in (True, False):
    engine.backward(engine(x, use_b))
    engine.step()
    clear_gradient_partitions(engine.optimizer)
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    for (name, p), q in zip(engine.module.named_parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), (name, (p - q).abs().max().item())
print("MATCH")
""".replace("@PORT@", str(free_port()))
    proc = subprocess.run(["python", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert "MATCH" in proc.stdout, proc.stderr[-3000:]


def test_tensorboard_has_every_scalar_and_status_is_complete(runs):
    out = runs["zero2_2ranks"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s",
                "train/mfu", "mem/max_allocated_gb", "eval/loss", "eval/acc/overall", "eval/acc/IMG"):
        values = scalars(out, tag)
        assert values and all(v == v for v in values.values()), tag
    lrs = scalars(out, "train/lr")
    assert lrs[1] < lrs[2] and lrs[STEPS] < max(lrs.values()), "warm-up then decay"
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert (out / "config.yaml").is_file()


def test_checkpoints_hold_only_trainable_state_and_keep_last(runs):
    root = runs["zero2_2ranks"] / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step-{STEPS:08d}"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == [
        "step-00000004", "step-00000008", "step-00000012"]
    tensors = load_file(root / f"step-{STEPS:08d}" / "trainable.safetensors")
    names = {key.split("/", 1)[1] for key in tensors}
    assert names == {"strategy.memory.memory_keys", "strategy.memory.memory_values", "strategy.projector.fc1.weight",
                     "strategy.projector.fc1.bias", "strategy.projector.fc2.weight", "strategy.projector.fc2.bias"}
    assert {key.split("/", 1)[0] for key in tensors} == {"param", "exp_avg", "exp_avg_sq"}
    size = sum(f.stat().st_size for f in (root / f"step-{STEPS:08d}").iterdir())
    assert size < 2 * sum(t.numel() * 4 for t in tensors.values()) + 100_000


def test_export_reloads_to_identical_logits_without_deepspeed(runs):
    from memvp_ds import build_model
    from memvp_ds.export import load_exported

    out = runs["zero2_2ranks"]
    model, cfg = load_exported(str(out / "export" / "trainable.safetensors"))
    final = load_file(out / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors")
    reference = build_model(cfg.model)
    reference.load_trainable({k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("param/")})
    ids, feats = torch.randint(4, 300, (2, 10)), torch.randn(2, 16, 32)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, image_features=feats).logits, reference(ids, image_features=feats).logits)
    assert not torch.count_nonzero(model.strategy.memory.memory_values) == 0, "export holds trained weights"


@pytest.mark.parametrize("config,extra", [("tiny_memvp", ("model.memvp.dropout=0.1", "train.ds_config=zero2")),
                                          ("tiny_llava_lora", ("train.ds_config=zero3",))], ids=["memvp", "llava_lora"])
def test_kill_and_resume_on_two_ranks_is_exact(dataset, tmp_path, config, extra):
    """SIGKILL the whole 2-rank job after its step-4 checkpoint, resume: the losses of every later step
    equal those of an uninterrupted run (same data order, same dropout masks, same optimizer state). LLaVA-LoRA
    runs on ZeRO-3 with LoRA's dropout (0.05) on, its LoRA tensors sharded inside the decoder blocks; its
    export then reloads without DeepSpeed to the final checkpoint's outputs."""
    out = tmp_path / "killed"
    common = (f"train.max_steps={STEPS}", "train.save_interval=4", *extra)
    run_train(train_overrides(dataset, tmp_path / "uninterrupted", *common), ranks=2, config=config)
    overrides = train_overrides(dataset, out, *common)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "memvp_ds/train.py",
           "--config", config, *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    # The pointer moves after the checkpoint folder is renamed into place: wait for both.
    while not (out / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert json.loads((out / "status.json").read_text() if (out / "status.json").exists() else "{}") == {}
    run_train(overrides, ranks=2, config=config)
    resumed_from = int(latest.split("-")[1])
    reference, resumed = scalars(tmp_path / "uninterrupted", "train/loss"), scalars(out, "train/loss")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(resumed_from + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    if config == "tiny_llava_lora":
        _assert_export_reloads_to_the_final_checkpoint(out)


def _assert_export_reloads_to_the_final_checkpoint(out):
    from memvp_ds import build_model
    from memvp_ds.export import load_exported

    model, cfg = load_exported(str(out / "export" / "trainable.safetensors"))
    final = load_file(out / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors")
    reference = build_model(cfg.model)
    reference.load_trainable({k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("param/")})
    lora_b = [p for name, p in model.trainable_parameters().items() if ".lora_B." in name]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b), "LoRA's B (zero at start) trained"
    ids, feats = torch.randint(4, 300, (2, 10)), torch.randn(2, 16, 32)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, image_features=feats).logits, reference(ids, image_features=feats).logits)


def test_two_rank_checkpoint_resumes_on_one_rank(dataset, runs, tmp_path):
    """Losing a node: the 2-rank step-8 checkpoint continues on 1 rank with the same weights, Adam
    moments and step (checked by gathering them back), then trains to the end."""
    out = tmp_path / "shrunk"
    shutil.copytree(runs["zero2_2ranks"] / "checkpoints", out / "checkpoints")
    (out / "checkpoints" / "latest").write_text("step-00000008\n")
    script = f"""
import sys; sys.argv = ["x"]
from memvp_ds.schema import load_config
from memvp_ds.distributed import init_distributed
from memvp_ds.engine.trainer import Trainer
from memvp_ds.engine import checkpoint as ckpt
from memvp_ds.engine.zero_state import gather_trainable
from safetensors.torch import load_file
import torch
cfg = load_config("tiny_memvp", {train_overrides(dataset, out, 'train.max_steps=12', NO_DROPOUT)!r})
trainer = Trainer(cfg, init_distributed())
state = ckpt.load_checkpoint(trainer.model, trainer.engine.optimizer, trainer.dist, trainer.resume_from, 0)
stored = load_file(trainer.resume_from + "/trainable.safetensors")
gathered = gather_trainable(trainer.model, trainer.engine.optimizer)
assert state["step"] == 8 and state["world_size"] == 2
assert set(stored) == set(gathered), (sorted(stored), sorted(gathered))
for key in stored:
    assert torch.equal(stored[key], gathered[key]), key
print("RESTORED", len(stored), flush=True)
print("STATUS", trainer.train()["status"])  # and train on to the end, on one rank
"""
    proc = subprocess.run(["python", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert "RESTORED 18" in proc.stdout and "STATUS complete" in proc.stdout, proc.stderr[-3000:]
    assert sorted(scalars(out, "train/loss")) == [9, 10, 11, 12]
    assert json.loads((out / "status.json").read_text())["step"] == 12


def test_text_only_and_image_batches_on_different_ranks_do_not_hang(tmp_path):
    """ZeRO-3 gathers parameters collectively: a rank streaming only text must still run the projector."""
    from tests.conftest import prepare_dataset

    data = prepare_dataset(tmp_path / "data", num_train=48, num_val=8, num_test=8, samples_per_shard=24)
    # Rewrite the two train shards: one all text-only, one all images.
    from data_prep.shards import write_shard
    from memvp_ds.data.shard_format import read_shard

    names = data["train"].split("::")
    samples = [s for name in names for s in read_shard(name)]
    text = [(k, {**f, "has_image": False}, None) for k, f, _ in samples]
    images = [s for s in samples if s[2] is not None]
    manifest_path = os.path.join(os.path.dirname(names[0]), "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    rewritten = {entry["name"]: entry for entry in (write_shard(names[0], text[:24]),
                                                    write_shard(names[1], (images * 2)[:24]))}
    for entry in manifest["shards"]:  # the manifest describes the shards as they now are
        entry.update(rewritten.get(entry["name"], {}))
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    out = tmp_path / "run"
    run_train(train_overrides(data, out, "train.max_steps=6", "train.ds_config=zero3",
                              "data.shuffle_buffer=1"), ranks=2, timeout=240)
    assert json.loads((out / "status.json").read_text())["status"] == "complete"


def test_corrupt_shard_is_skipped_and_counted(dataset, tmp_path):
    shards = dataset["train"].split("::")
    bad = tmp_path / shards[0].split("/")[-1]
    data = open(shards[0], "rb").read()
    # Cut mid-member and zero-filled to the listed size (a truncated shard of another size is refused before
    # training by the plan's size check: tests/test_dry_run.py): readers stop at the zeros, so the samples
    # after the cut are missing, and they are counted.
    bad.write_bytes(data[: len(data) // 3] + bytes(len(data) - len(data) // 3))
    manifest = tmp_path / "manifest.json"
    shutil.copy(os.path.join(os.path.dirname(shards[0]), "manifest.json"), manifest)
    out = tmp_path / "run"
    spec = "::".join([str(bad)] + shards[1:])
    run_train(train_overrides({**dataset, "train": spec}, out, "train.max_steps=20", f"data.manifest={manifest}"))
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert sum(scalars(out, "data/skipped_samples").values()) >= 1


def test_config_errors_come_before_any_model_is_built(dataset, tmp_path, capsys):
    """memvp-train checks the DeepSpeed JSON and the shards against the model before it starts a process
    group or builds anything: called in this process, it returns the one error line at once."""
    from memvp_ds.train import main

    ds = tmp_path / "bad_ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}))
    cases = [(f"train.ds_config={ds}", "train_micro_batch_size_per_gpu' is 3"),
             ("model.visual_dim=48", "16 x 32 features"), ("train.bogus=1", "train.bogus")]
    for override, needle in cases:
        assert main(["--config", "tiny_memvp", *train_overrides(dataset, tmp_path / "o", override)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], (override, errors)
    assert not torch.distributed.is_initialized() and not (tmp_path / "o").exists()


def test_zero3_loads_a_checkpoint_partitioned_with_less_host_memory(dataset, tmp_path):
    """A model loaded from a local HF directory under ZeRO-3 is partitioned: each rank holds about half
    the frozen weights after loading, where ZeRO-2 holds all of them on every rank. (Peak RSS is logged too
    but is no fair gauge at this size: transient per-module buffers and allocator high-water marks dominate
    it; during steps ZeRO-3 keeps up to stage3_max_live_parameters gathered, all of a model this small.)"""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=400, bos_token_id=0, eos_token_id=1, pad_token_id=3)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llm")  # ~151M parameters, 600 MB fp32
    held, model_gb = {}, 151e6 * 4 / 2**30
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}"
        run_train(train_overrides(dataset, out, "train.max_steps=1", f"train.ds_config=zero{stage}",
                                  f"model.llm.path={tmp_path / 'llm'}", "model.llm.config=null",
                                  "data.max_seq_len=64", "train.micro_batch_size=2"), ranks=2, timeout=300)
        held[stage] = [scalars(out, f"mem/rank{rank}_after_load_gb")[0] for rank in (0, 1)]
    for rank in (0, 1):  # ZeRO-3 saves at least a third of the model per rank (half, minus noise)
        assert held[3][rank] < held[2][rank] - model_gb / 3, held
