"""benchmarks/run_files.py: the compact file a driver keeps of a finished run, in place of its folder, and what a
driver reuses it by."""

import json
import os
import sys

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import run_files  # noqa: E402


def finished_run(folder, scalars, rows):
    """A run folder as the scripts leave it: TensorBoard events under runs/<name>/, the generations of each
    evaluation under runs/<name>/generations/."""
    events = folder / "runs" / "task__ppo__1__0"
    writer = SummaryWriter(str(events))
    for tag, series in scalars.items():
        for step, value in series:
            writer.add_scalar(tag, value, step)
    writer.close()
    (events / "generations").mkdir()
    (events / "generations" / "iteration_0000.jsonl").write_text("not the last evaluation\n")
    (events / "generations" / "iteration_0002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


ROWS = [{"prompt": "p1", "continuation": " a", "references": ["r1", "r1'"], "score": 0.123456789},
        {"prompt": "p2", "continuation": " b", "references": ["r2"], "score": 1.0}]
SCALARS = {"eval/cider_d": [(0, 0.5), (8, 0.6123456789)], "objective/scores": [(4, 1.0), (8, 2.0)],
           "guide/score_mixed": [(4, 3.0)], "timing/update_s": [(4, 9.0)], "charts/eps": [(4, 2.0)]}


def test_a_run_folder_becomes_one_compact_file_and_reads_back(tmp_path):
    """The scalars the tables read (not timings, not charts), exact to float32 as TensorBoard keeps them; the last
    evaluation's rows; the prompts and references once for two runs that evaluated the same set."""
    records = tmp_path / "records"
    for name in ("a", "b"):
        folder = finished_run(tmp_path / name, SCALARS, ROWS)
        record = run_files.write(str(records), name, ["ppo.py", "--seed", "1"], 12.34, "abc1234", str(folder))
    assert set(record["scalars"]) == {"eval/cider_d", "objective/scores", "guide/score_mixed"}
    assert np.float32(record["scalars"]["eval/cider_d"][1][1]) == np.float32(0.6123456789)  # (no loss)
    assert record["generations"] == [{**r, "score": pytest.approx(r["score"], rel=1e-6)} for r in ROWS]
    assert (record["command"], record["seconds"], record["commit"]) == (["ppo.py", "--seed", "1"], 12.3, "abc1234")
    assert run_files.load(str(records), "b") == {**run_files.load(str(records), "a"), "name": "b"}
    assert len(os.listdir(records / "eval_sets")) == 1 and sorted(os.listdir(records)) == ["a.json", "b.json", "eval_sets"]
    assert run_files.load(str(records), "c") is None


def test_a_run_is_reused_by_its_command_wherever_the_checkout_is(tmp_path):
    """Paths inside the repository are kept relative to it, so a clone elsewhere reuses the run; a flag given its
    scripts' default (which older runs did not pass) changes nothing; any other difference is a new run."""
    folder = finished_run(tmp_path / "run", SCALARS, ROWS)
    data = os.path.join(ROOT, "benchmarks", "work", "x", "data")
    command = ["ppo.py", "--dataset-path", data, "--seed", "1"]
    run_files.write(str(tmp_path), "run", command, 1.0, "abc", str(folder))
    assert json.loads((tmp_path / "run.json").read_text())["command"][2] == os.path.join("benchmarks", "work", "x", "data")
    assert run_files.finished(str(tmp_path), "run", command)
    assert run_files.finished(str(tmp_path), "run", command + ["--advantage-estimator", "gae", "--samples-per-prompt", "1"])
    assert not run_files.finished(str(tmp_path), "run", command + ["--advantage-estimator", "rloo"])
    assert not run_files.finished(str(tmp_path), "run", ["ppo.py", "--dataset-path", data, "--seed", "2"])
    assert not run_files.finished(str(tmp_path), "other", command)


def test_a_run_still_to_make_whose_model_is_gone_stops_with_one_line(tmp_path):
    """Models are not committed: a job that needs one an earlier job made in the work folder names the record to
    delete, and runs nothing."""
    work = tmp_path / "work"
    jobs = [("rl", "ppo.py", ["--model-name-or-path", str(work / "sl" / "model"), "--seed", "1"])]
    with pytest.raises(SystemExit, match=r"rl needs .*sl/model, which is gone .*records/sl\.json"):
        run_files.run_once(jobs, str(work), str(tmp_path / "records"), 1)
    assert not work.exists()


def test_a_run_that_did_not_evaluate_has_a_file_too(tmp_path):
    """sft.py --eval-every 0 (the IMDB driver's SL model) writes no generations: its file has none, and reads back."""
    folder = finished_run(tmp_path / "sl", {"loss/sft": [(4, 1.0)], "charts/lr": [(4, 0.1)]}, ROWS)
    for path in (folder / "runs").glob("*/generations/*"):
        path.unlink()
    record = run_files.write(str(tmp_path / "records"), "sl", ["sft.py"], 1.0, "abc", str(folder))
    assert record["generations"] == [] and record["scalars"] == {} and record["name"] == "sl"
    assert not (tmp_path / "records" / "eval_sets").exists()


def test_a_hub_id_or_a_model_outside_the_work_folder_is_never_called_gone(tmp_path, monkeypatch):
    """Only a model inside the work folder is one an earlier job made: `gpt2` (a hub id), with the work folder the
    current one, is the hub's, and an empty argument is no path at all."""
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(run_files, "run", lambda jobs, work_dir: ran.extend(jobs) or [0.0] * len(jobs))
    monkeypatch.setattr(run_files, "write", lambda *args: None)
    jobs = [("a", "ppo.py", ["--model-name-or-path", "gpt2", "--guide-model", str(tmp_path.parent), "--x", ""])]
    run_files.run_once(jobs, ".", str(tmp_path / "records"), 1)
    assert [name for name, _, _ in ran] == ["a"]


def test_a_file_whose_evaluated_prompts_are_missing_stops_with_one_line(tmp_path):
    folder = finished_run(tmp_path / "run", SCALARS, ROWS)
    run_files.write(str(tmp_path / "records"), "run", ["ppo.py"], 1.0, "abc", str(folder))
    for path in (tmp_path / "records" / "eval_sets").iterdir():
        path.unlink()
    with pytest.raises(SystemExit, match=r"run\.json evaluated the prompts of .*, which is missing"):
        run_files.finished(str(tmp_path / "records"), "run", ["ppo.py"])
