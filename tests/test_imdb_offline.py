"""benchmarks/imdb_offline.py end to end on tiny models (one seed, PPO and PPO++): the table names the commit and
the models' checksums that made it, and its numbers are those the runs themselves wrote."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, read_tensorboard, save_tiny_causal_lm, save_tiny_classifier


@pytest.mark.slow
def test_the_driver_end_to_end(assets, tmp_path):
    models = tmp_path / "models"
    save_tiny_causal_lm(models / "smollm2-135m", assets["tokenizer"], initializer_range=0.5)
    save_tiny_classifier(models / "sentiment-imdb", assets["tokenizer"], num_labels=2)
    # offline_assets.py writes BUILD.json with the checksums of what it built; the table reports them
    (models / "sentiment-imdb" / "BUILD.json").write_text(json.dumps(
        {"test_accuracy": 0.5, "files": {"model.safetensors": "ab" * 32}}))
    (tmp_path / "data").mkdir()
    os.symlink(assets["data"]["imdb"], tmp_path / "data" / "imdb")
    work, out = tmp_path / "work", tmp_path / "results" / "imdb"
    records = tmp_path / "records"
    argv = ["--models-dir", str(models), "--data-dir", str(tmp_path / "data"), "--work-dir", str(work),
            "--records-dir", str(records),
            "--out", str(out), "--seeds", "1", "--methods", "ppo", "ppo_plus_plus", "--batch-size", "4",
            "--num-iterations", "2", "--num-minibatches", "2", "--update-epochs", "1", "--eval-every", "1",
            "--learning-rate", "0.01",  # the tiny policy must move, so a first evaluation differs from the last
            "--sl-steps", "2", "--sl-batch-size", "4", "--num-eval-prompts", "4", "--max-new-tokens", "6"]
    def driver():
        result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "imdb_offline.py"), *argv],
                                cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    driver()
    table = (tmp_path / "results" / "imdb.md").read_text()
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    assert f"every run made at commit `{commit}`" in table
    assert "classifier model.safetensors sha256 abababababab, test accuracy 0.5" in table
    assert "policy model.safetensors" not in table  # no BUILD.json there: nothing claimed
    assert (tmp_path / "results" / "imdb.png").stat().st_size > 0
    # each row's final score is the run's own last eval/score, and its compact file keeps its last generations
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if re.match(r"\| (PPO|PPO\+\+) \| 1 \|", line)}
    assert any(row.split(" | ")[2] != row.split(" | ")[3] for row in rows.values())  # start != final: it can tell
    for name, label in (("ppo_seed1", "PPO"), ("ppo_plus_plus_seed1", "PPO++")):
        final = read_tensorboard(work / name).Scalars("eval/score")[-1].value
        assert rows[label].split(" | ")[3] == f"{final:.3f}"
        kept = json.loads((records / f"{name}.json").read_text())
        assert len(kept["generations"]) == 4 and kept["scalars"]["eval/score"][-1][1] == pytest.approx(final)
        scores = [score for _, score in kept["generations"]]
        assert abs(sum(scores) / len(scores) - final) < 1e-4
    # the runs' folders gone (a fresh clone: only the compact files are committed), the driver makes no run and
    # writes the same table
    shutil.rmtree(work)
    assert "done in" not in driver() and not (work / "sl").exists()
    assert (tmp_path / "results" / "imdb.md").read_text() == table
