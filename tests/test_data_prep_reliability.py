"""data_prep's guarantees on bad input (see docs/reliability.md): each refusal is one line naming the file,
record or option, and comes before anything is written; verify catches non-finite features."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from data_prep.cli import main as prep_main
from data_prep.clip_model import native_image_size
from data_prep.synthetic import make_synthetic_scienceqa
from tests.conftest import TINY_VIT
from tests.helpers import REPO

TINY = ["--clip-model", TINY_VIT, "--clip-pretrained", "random", "--workers", "0"]
IMAGENET = "mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)"
CLIP_OWN_MEAN = "0.48145466"


def _files_under(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _refused(capsys, tmp_path, args) -> str:
    """Run extract; it must exit 2 with one error line and leave every file under tmp_path as it was."""
    before = _files_under(tmp_path)
    assert prep_main(["extract", "--out", str(tmp_path / "out"), *args]) == 2
    assert _files_under(tmp_path) == before and not (tmp_path / "out").exists()
    return _one_error_line(capsys)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("split", ["../../escaped", "ABSOLUTE", ".hidden", "a/b", ""])
def test_split_that_is_not_a_plain_name_is_refused_before_writing(tmp_path, capsys, split):
    split = str(tmp_path / "escaped") if split == "ABSOLUTE" else split
    rows = [{"id": "q1", "question": "Q?", "answer": "a"}, {"id": "q2", "question": "Q?", "answer": "b", "split": split}]
    annotations = _write_jsonl(tmp_path / "qa.jsonl", rows)
    line = _refused(capsys, tmp_path, ["--source", "jsonl", "--annotations", annotations, *TINY])
    assert "'q2'" in line and repr(split) in line and "plain name" in line


def test_split_option_that_is_not_a_plain_name_is_refused(tmp_path, capsys):
    llava = [{"id": "x1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    line = _refused(capsys, tmp_path, ["--source", "llava", "--annotations", str(tmp_path / "llava.json"),
                                       "--split", "../up", *TINY])
    assert "'x1'" in line and "'../up'" in line


def test_colliding_sample_keys_are_reported_with_their_ids(tmp_path, capsys):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    # x.1 and x_1 differ as ids but share the tar-safe key x_1; dup is simply repeated.
    llava = [{"id": i, "conversations": turns} for i in ("x.1", "ok", "x_1", "dup", "dup")]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    line = _refused(capsys, tmp_path, ["--source", "llava", "--annotations", str(tmp_path / "llava.json"), *TINY])
    assert "key 'x_1' <- ids 'x.1', 'x_1'" in line and "key 'dup' <- ids 'dup', 'dup'" in line
    assert "'ok'" not in line


_VALID_QA = json.dumps({"id": "q1", "question": "Colour?", "answer": "red"})
_TURNS = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
_PROBLEM = {"question": "Which?", "choices": ["a", "b"], "answer": 1, "image": None}


def _lines(*lines) -> bytes:
    return b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines)


MALFORMED = {  # case: (file, content, fragments the error line must hold)
    "jsonl line not an object": ("qa.jsonl", _lines(_VALID_QA, "[1, 2]"), ["qa.jsonl:2:", "JSON object"]),
    "jsonl bad JSON": ("qa.jsonl", _lines(_VALID_QA, '{"id": "q2", "question": '), ["qa.jsonl:2:", "invalid JSON"]),
    "jsonl missing field": ("qa.jsonl", _lines(_VALID_QA, '{"id": "q2", "question": "Shape?"}'),
                            ["qa.jsonl:2 (id 'q2')", "'answer' is missing"]),
    "jsonl wrong type": ("qa.jsonl", _lines('{"id": "q1", "question": ["Colour?"], "answer": "red"}'),
                         ["qa.jsonl:1 (id 'q1')", "'question' must be a string, got list"]),
    "jsonl choices not a list": ("qa.jsonl", _lines('{"id": "q1", "question": "Q", "answer": "a", "choices": "a,b"}'),
                                 ["qa.jsonl:1 (id 'q1')", "'choices' must be a list of strings"]),
    "jsonl not utf-8": ("qa.jsonl", _lines(_VALID_QA, b'{"id": "q\xff"}'), ["qa.jsonl:2:", "not UTF-8"]),
    "llava turn without value": ("llava.json", _lines(json.dumps([{"id": "a", "conversations": _TURNS},
                                                                  {"id": "b", "conversations": [{"from": "human"}]}])),
                                 ["llava.json: record 1 (id 'b')", "has no text ('value' or 'content')"]),
    "llava not a list": ("llava.json", _lines(json.dumps({"id": "a", "conversations": _TURNS})),
                         ["llava.json:", "expected a JSON list of records, got a JSON dict"]),
    "llava bad JSON": ("llava.json", _lines('[{"id": "a",', '  "conversations": ]'),
                       ["llava.json:", "invalid JSON at line 2"]),
    "scienceqa answer not an index": ("problems.json", _lines(json.dumps({"1": _PROBLEM, "2": {**_PROBLEM, "answer": "B"}})),
                                      ["problems.json: problem '2'", "'answer' must be an integer"]),
    "scienceqa answer out of range": ("problems.json", _lines(json.dumps({"1": _PROBLEM, "2": {**_PROBLEM, "answer": 2}})),
                                      ["problems.json: problem '2'", "answer 2 is not an index into its 2 choices"]),
    "scienceqa problem missing": ("problems.json", _lines(json.dumps({"1": _PROBLEM})),
                                  ["pid_splits.json: split 'train' lists problem '2'", "problems.json does not have"]),
    "scienceqa bad JSON": ("problems.json", _lines('{"1": {"question": "Which?",}}'), ["problems.json:", "invalid JSON"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_annotation_file_fails_with_one_line_naming_file_and_record(tmp_path, capsys, case):
    name, content, expected = MALFORMED[case]
    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_bytes(content)
    if name == "problems.json":
        (data / "pid_splits.json").write_text(json.dumps({"train": ["1", "2"]}))
        source = ["--source", "scienceqa", "--root", str(data), "--splits", "train"]
    else:
        source = ["--source", "jsonl" if name.endswith(".jsonl") else "llava", "--annotations", str(data / name)]
    line = _refused(capsys, tmp_path, [*source, *TINY])
    assert str(data) in line
    for fragment in expected:
        assert fragment in line, line


def test_download_tag_without_allow_download_fails_first_with_how_to_get_weights(tmp_path, capsys):
    # Annotations that would fail to parse prove the weights are checked before any data is read.
    (tmp_path / "problems.json").write_text("not json")
    (tmp_path / "pid_splits.json").write_text("not json")
    line = _refused(capsys, tmp_path, ["--source", "scienceqa", "--root", str(tmp_path)])  # --clip-pretrained openai
    assert "--clip-pretrained openai" in line and "--allow-download" in line and "local checkpoint file" in line
    line = _refused(capsys, tmp_path, ["--source", "scienceqa", "--root", str(tmp_path), "--clip-model", TINY_VIT,
                                       "--clip-pretrained", str(tmp_path / "absent.bin")])
    assert "absent.bin: no such checkpoint file" in line


def test_image_size_defaults_to_the_clip_models_own():
    assert native_image_size("ViT-L-14") == 224
    assert native_image_size("ViT-L-14-336") == 336
    assert native_image_size(TINY_VIT) == 64


def test_extract_uses_the_models_image_size_and_states_the_normalisation_it_applies(tmp_path, capsys):
    make_synthetic_scienceqa(str(tmp_path / "sqa"), num_train=6, num_val=0, num_test=0, seed=3)
    source = ["--source", "scienceqa", "--root", str(tmp_path / "sqa"), "--splits", "train"]
    # A subprocess, so that logging is configured as for a user (pytest holds back INFO records otherwise).
    proc = subprocess.run([sys.executable, "-m", "data_prep", "extract", *source, "--out", str(tmp_path / "out"), *TINY],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["recipe"]["image_size"] == 64 and manifest["recipe"]["tokens"] == 16
    output = proc.stdout + proc.stderr
    assert f"images resized to 64x64 (bicubic, no crop), normalised with {IMAGENET}" in output
    assert CLIP_OWN_MEAN not in output, "open_clip's own (unused) normalisation must not be announced"
    assert prep_main(["inspect", str(tmp_path / "out")]) == 0
    assert IMAGENET in capsys.readouterr().out
    (tmp_path / "again").mkdir()
    line = _refused(capsys, tmp_path / "again", [*source, *TINY, "--image-size", "224"])
    assert "--image-size 224" in line and "64x64" in line


def _poison_features(shard, values):
    """Rewrite ``shard`` with features[0, 0] of sample key -> value; return (bytes, sha256)."""
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            key, _, ext = member.name.partition(".")
            if ext == "npy" and key in values:
                features = np.load(io.BytesIO(data), allow_pickle=False)
                features[0, 0] = values[key]
                buffer = io.BytesIO()
                np.save(buffer, features, allow_pickle=False)
                data, member.size = buffer.getvalue(), len(buffer.getvalue())
            tar.addfile(member, io.BytesIO(data))
    return os.path.getsize(shard), hashlib.sha256(open(shard, "rb").read()).hexdigest()


def test_verify_reports_nan_and_inf_features_by_shard_and_key(tmp_path, capsys):
    make_synthetic_scienceqa(str(tmp_path / "sqa"), num_train=12, num_val=0, num_test=0, seed=4)
    out = tmp_path / "out"
    assert prep_main(["extract", "--source", "scienceqa", "--root", str(tmp_path / "sqa"), "--splits", "train",
                      "--out", str(out), *TINY]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["shards"][0]
    with tarfile.open(out / entry["name"]) as tar:
        keys = sorted({m.name.partition(".")[0] for m in tar if m.name.endswith(".npy")})
    # The checksum in the manifest is brought up to date, so only the values themselves are wrong.
    entry["bytes"], entry["sha256"] = _poison_features(out / entry["name"], {keys[0]: np.nan, keys[1]: np.inf})
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert prep_main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"FAIL {entry['name']}: sample {keys[0]} has 1 NaN and 0 inf feature values" in err
    assert f"FAIL {entry['name']}: sample {keys[1]} has 0 NaN and 1 inf feature values" in err
    assert err.count("FAIL") == 2, err
