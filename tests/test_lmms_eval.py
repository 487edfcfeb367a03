"""The lmms-eval plug-in through the real ``lmms_eval`` command, offline, on a tiny ScienceQA split.

One export (the tiny MemVP model fitted for a few steps to the synthetic ScienceQA's answer format, so that it
answers with option letters) is scored in ONE harness run on three tasks: the two shipped ScienceQA tasks
(memvp_ds/integrations/lmms_eval_tasks/, included by YAMLs written here that point them at the test split
saved with ``datasets``' save_to_disk; --include_path to that folder) and a two-round task. ``generate_until``
is compared with memvp-eval on the same questions (same prompt, the shards' features of the same images), the
multiple-choice losses with a token-by-token computation through the KV cache, the two rounds with
plain greedy answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from memvp_ds.scoring.scienceqa import OPTION_LETTERS
from memvp_ds.integrations import LMMS_EVAL_TASKS
from tests.conftest import prepare_dataset, tiny_config
from tests.helpers import REPO

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[eval]')")

TASKS = ("memvp_tiny_gen", "memvp_tiny_mc", "memvp_tiny_rounds")
ROUNDS_UTILS = '''
from memvp_ds.integrations.lmms_eval_tasks.utils import doc_to_text  # the shipped tasks' question text


def two_rounds(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    """Round 0: the question with its image; round 1: the same question without the image; then done."""
    if round_idx is None:
        return doc_to_text(doc)
    if round_idx == 1:
        return None, doc_to_text(doc), False, previous_output, None
    return None, None, True, previous_output, None


def rounds_answered(doc, results):
    return {"rounds": float(len(results[0]))}
'''
LOCAL_DATA = "dataset_path: {data}\ndataset_kwargs:\n  load_from_disk: true\n"
YAMLS = {
    # The shipped ScienceQA tasks, on the local copy of the split.
    "memvp_tiny_gen": "include: {shipped}/scienceqa_img_memvp.yaml\n",
    "memvp_tiny_mc": "include: {shipped}/scienceqa_img_memvp_mc.yaml\n",
    "memvp_tiny_rounds": """include: {shipped}/scienceqa_img_memvp.yaml
output_type: generate_until_multi_round
doc_to_text: !function utils.two_rounds
generation_kwargs:
  max_new_tokens: 3
process_results: !function utils.rounds_answered
metric_list:
  - metric: rounds
    aggregation: mean
    higher_is_better: true
""",
}


@pytest.fixture(autouse=True)
def _cpu_threads():
    """One torch thread (this module's models are tiny): two threads on busy shared cores spin against each
    other, which made the token-by-token checks 40x slower."""
    torch.set_num_threads(1)


def _fit_answer_format(cfg, tokenizer, shards: str, steps: int = 100):
    """AdamW steps of the trainable tensors on the train split (plain PyTorch, the model's own loss): enough
    for the answer format, so that the answers are option letters rather than noise (after this little
    training, the most frequent one: the generated answers do not show the image, the log-likelihoods do)."""
    from memvp_ds.data.collate import build_encoder
    from memvp_ds.data.stream import iterate_eval_batches
    from memvp_ds.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=0.01)
    batches = list(iterate_eval_batches(shards.split("::"), build_encoder(cfg, tokenizer), 8, tokenizer.pad_token_id,
                                        0, 1, left_pad=False))
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                     image_features=batch["image_features"], has_image=batch["has_image"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _write_tasks(root: Path, sqa: Path) -> Tuple[Path, List[str]]:
    """The test split as a datasets DatasetDict on disk (images as datasets.Image) and the three task YAMLs;
    returns the task folder and the problem ids in document order."""
    import datasets
    from PIL import Image

    problems = json.loads((sqa / "problems.json").read_text())
    test = [(pid, p) for pid, p in problems.items() if p["split"] == "test"]
    rows = {"pid": [pid for pid, _ in test], "question": [p["question"] for _, p in test],
            "choices": [p["choices"] for _, p in test], "hint": [p["hint"] for _, p in test],
            "answer": [p["answer"] for _, p in test],
            "image": [Image.open(sqa / "images" / "test" / pid / p["image"]) if p["image"] else None
                      for pid, p in test]}
    features = datasets.Features({"pid": datasets.Value("string"), "question": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "hint": datasets.Value("string"), "answer": datasets.Value("int64"),
                                  "image": datasets.Image()})
    data = root / "tiny_sqa"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(data))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(ROUNDS_UTILS)
    for name, body in YAMLS.items():
        (tasks / f"{name}.yaml").write_text(body.format(shipped=LMMS_EVAL_TASKS) + f"task: {name}\n" +
                                            LOCAL_DATA.format(data=data))
    return tasks, rows["pid"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The dataset, the export, memvp-eval's scores and the harness's, computed once for the module."""
    from memvp_ds.data.tokenizer import load_tokenizer
    from memvp_ds.evaluate import main as memvp_eval
    from memvp_ds.export import write_export

    torch.set_num_threads(1)  # the fixture above runs after this one (memvp-eval then sets its own count)
    root = tmp_path_factory.mktemp("lmms")
    dataset = prepare_dataset(root, num_train=64, num_val=4, num_test=24, samples_per_shard=32)
    cfg = tiny_config("memvp", f"data.tokenizer={dataset['tokenizer']}")
    tokenizer = load_tokenizer(dataset["tokenizer"])
    model = _fit_answer_format(cfg, tokenizer, dataset["train"]).eval()
    weights = root / "trainable.safetensors"
    write_export({k: v.detach().contiguous() for k, v in model.trainable_parameters().items()}, str(weights), cfg,
                 dataset["manifest"]["recipe"])
    environ = dict(os.environ)
    try:
        assert memvp_eval(["--weights", str(weights), "--split", "test", "--shards", dataset["test"],
                           "--output", str(root / "memvp_eval")]) == 0
    finally:  # its process group of one set RANK, MASTER_PORT, ...: later tests' launches must not inherit them
        os.environ.clear()
        os.environ.update(environ)
    tasks, pids = _write_tasks(root, root / "sqa")
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "memvp", "--model_args", f"weights={weights}",
           "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--batch_size", "4", "--device", "cpu",
           "--output_path", str(root / "harness"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    # lmms-eval logs an error and still exits 0 when the evaluation fails: the results file tells.
    written = list((root / "harness").rglob("*_results.json"))
    assert proc.returncode == 0 and written, proc.stdout[-4000:] + proc.stderr[-8000:]
    results = json.loads(written[0].read_text())
    samples = {}  # task -> problem id -> the harness's logged sample
    for task in TASKS:
        logged = [json.loads(line) for line in open(next((root / "harness").rglob(f"*_samples_{task}.jsonl")))]
        samples[task] = {pids[sample["doc_id"]]: sample for sample in logged}
    return {"root": root, "dataset": dataset, "cfg": cfg, "tokenizer": tokenizer, "model": model,
            "results": results["results"], "samples": samples, "log": proc.stdout + proc.stderr}


def _shard_questions(harness) -> List[Dict]:
    """memvp-eval's own view of the test split: prompt ids, stored features and fields per problem."""
    from memvp_ds.data.stream import iterate_eval_batches
    from memvp_ds.evaluation.run import eval_encoder

    tokenizer = harness["tokenizer"]
    batches = iterate_eval_batches(harness["dataset"]["test"].split("::"), eval_encoder(harness["cfg"], tokenizer), 1,
                                   tokenizer.pad_token_id, 0, 1)
    return [{"pid": b["keys"][0], "ids": b["input_ids"][:, b["attention_mask"][0].bool()],  # without the padding
             "features": b["image_features"], "has_image": b["has_image"], "fields": b["fields"][0]}
            for b in batches if bool(b["valid"][0])]


def test_generate_until_answers_and_scores_as_memvp_eval(harness):
    """Same questions, same prompt, same images: the harness's answers are memvp-eval's, so is the accuracy."""
    out = harness["root"] / "memvp_eval"
    metrics = json.loads((out / "metrics_test.json").read_text())
    answers = {p["id"]: p["output"] for p in map(json.loads, open(out / "predictions_test.jsonl"))}
    logged = harness["samples"]["memvp_tiny_gen"]
    assert len(answers) == len(logged) == 24
    assert {pid: sample["filtered_resps"][0] for pid, sample in logged.items()} == answers
    assert metrics["count/parse_failures"] < metrics["count/overall"], "the fitted export answers no letter at all"
    assert 100 * harness["results"]["memvp_tiny_gen"]["acc,none"] == pytest.approx(metrics["acc/overall"], abs=1e-9)
    assert "memvp: first prompt of task memvp_tiny_gen: '<s>Question:" in harness["log"]


@torch.no_grad()
def _option_loss(model, tokenizer, question: Dict, letter: str, with_image: bool = True) -> float:
    """-log p(' X' | prompt, image) per token of ' X', token by token through the KV cache (prefill + decode
    steps): another path than the plug-in's one teacher-forced forward over right-padded rows."""
    from memvp_ds.data.prompts import bos_ids

    prompt = question["ids"][0].tolist()
    text = tokenizer.decode(prompt[len(bos_ids(tokenizer)):])
    whole = bos_ids(tokenizer) + tokenizer.encode(text + " " + letter, add_special_tokens=False)
    assert whole[:len(prompt)] == prompt
    has_image = question["has_image"] & with_image
    hidden, cache, mask = model.prefill(question["ids"], torch.ones_like(question["ids"]), question["features"],
                                        has_image)
    lm_head, total, continuation = model.llm.get_output_embeddings(), 0.0, whole[len(prompt):]
    for token in continuation:
        total -= float(torch.log_softmax(lm_head(hidden).float(), -1)[0, token])
        hidden, mask = model.decode_step(torch.tensor([token]), mask, cache)
    return total / len(continuation)


def test_multiple_choice_losses_match_a_token_by_token_computation(harness):
    """lmms-eval picks the option with the lowest value (a loss); the accuracy is that of the lowest losses."""
    model, tokenizer = harness["model"], harness["tokenizer"]
    logged = harness["samples"]["memvp_tiny_mc"]
    right, image_moved = [], []
    for question in _shard_questions(harness):
        letters = OPTION_LETTERS[:len(question["fields"]["choices"])]
        expected = [_option_loss(model, tokenizer, question, letter) for letter in letters]
        scored = [float(loss) for loss, _ in logged[question["pid"]]["filtered_resps"]]
        assert scored == pytest.approx(expected, abs=1e-4), question["pid"]
        right.append(min(range(len(letters)), key=expected.__getitem__) == int(question["fields"]["answer"]))
        if bool(question["has_image"][0]):  # the comparison sees the image: without it the numbers move
            image_moved.append(abs(_option_loss(model, tokenizer, question, "A", False) - expected[0]))
    assert len(right) == 24 and max(image_moved) > 1e-3
    assert harness["results"]["memvp_tiny_mc"]["acc,none"] == pytest.approx(sum(right) / len(right), abs=1e-9)


def test_multi_round_answers_each_round_greedily(harness):
    """Round 0 with the image, round 1 (from the task's doc_to_text) without it: plain greedy answers each."""
    model, tokenizer = harness["model"], harness["tokenizer"]
    logged = harness["samples"]["memvp_tiny_rounds"]
    assert harness["results"]["memvp_tiny_rounds"]["rounds,none"] == 2.0
    for question in _shard_questions(harness):
        rounds = []
        for has_image in (question["has_image"], torch.zeros_like(question["has_image"])):
            tokens = model.generate(question["ids"], image_features=question["features"], has_image=has_image,
                                    max_new_tokens=3, eos_token_id=tokenizer.eos_token_id)[0].tolist()
            kept = [t for t in tokens if t != tokenizer.eos_token_id]
            rounds.append(tokenizer.decode(kept, skip_special_tokens=True))
        assert logged[question["pid"]]["filtered_resps"][0] == rounds, question["pid"]


def test_settings_the_model_cannot_honour_are_refused_in_one_line():
    from PIL import Image

    from memvp_ds.integrations.lmms_eval_plugin import MemVP, cut_at_stop, greedy_settings, one_image

    assert greedy_settings({"until": "\n", "max_new_tokens": 4, "temperature": 0, "top_p": 0}, "t") == (["\n"], 4)
    assert greedy_settings({}, "t") == ([], None)
    for bad, word in (({"temperature": 0.7}, "sampling"), ({"do_sample": True}, "sampling"),
                      ({"num_beams": 4}, "beam search")):
        with pytest.raises(ValueError, match=f"task x: .*{word}.*--gen_kwargs"):
            greedy_settings(bad, "task x")
    assert cut_at_stop(" A.\nB", ["\n", "."]) == " A" and cut_at_stop(" A", ["\n"]) == " A"
    image = Image.new("RGBA", (4, 4))
    assert one_image([image], "d").mode == "RGB" and one_image([], "d") is None and one_image(None, "d") is None
    with pytest.raises(ValueError, match="task x, doc 3: 2 images; the memvp plug-in takes one"):
        one_image([image, image], "task x, doc 3")
    with pytest.raises(ValueError, match="a str as visual input"):
        one_image(["clip.mp4"], "d")
    with pytest.raises(ValueError, match="--batch_size auto: .*positive integer"):
        MemVP(weights="unused.safetensors", batch_size="auto")
    with pytest.raises(FileNotFoundError, match="exported weights not found: /nonexistent.safetensors"):
        MemVP(weights="/nonexistent.safetensors")



def test_a_chat_template_export_answers_generate_until_tasks_only(tmp_path):
    """Its answers end in the template's end-of-turn token, not the EOS a log-likelihood continuation drops."""
    from memvp_ds.integrations.lmms_eval_plugin import MemVP
    from tests.chat_tokenizers import chat_tokenizer
    from tests.conftest import write_tiny_export

    tokenizer_dir = chat_tokenizer(str(tmp_path / "tok"), "qwen2")
    model = MemVP(weights=write_tiny_export(tmp_path / "chat.safetensors", tokenizer_dir, "memvp",
                                            "data.prompt_format=chat_template"))
    ids = model._prompt_ids("What colour is the circle?", "t", "doc 0")
    assert model.tokenizer.decode(ids).startswith("<|im_start|>system")  # the template renders the prompt
    with pytest.raises(ValueError, match="data.prompt_format=chat_template export is scored with generate_until"):
        model.loglikelihood([])
