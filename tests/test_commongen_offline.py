"""benchmarks/commongen_offline.py: its own pieces (concept coverage, the verdict, the metrics of a generations
file) against known values, and the driver end to end on the tiny models, its table checked against what the
runs themselves wrote."""

import importlib.util
import json
import os
import re
import shutil
import statistics
import sys

import pytest

from common import metrics
from conftest import ROOT, read_tensorboard, save_tiny_causal_lm

spec = importlib.util.spec_from_file_location("commongen_offline",
                                              os.path.join(ROOT, "benchmarks", "commongen_offline.py"))
driver = importlib.util.module_from_spec(spec)
spec.loader.exec_module(driver)


@pytest.mark.parametrize("concept,sentence", [
    ("stand", "The player stood in the field."),      # irregular past: the lexicon's lemma
    ("stand", "Two men are standing by the door."),
    ("stand", "She stands up."),
    ("mouse", "The mice ran away."),                   # irregular plurals
    ("child", "Children eat food."),
    ("tooth", "He brushes his teeth."),
    ("run", "The dog ran after the ball."),            # irregular verbs
    ("sit", "They sat on the couch."),
    ("swim", "The kids swam in the lake."),
    ("go", "We went home."),
    ("dance", "A kid is dancing in the room."),        # regular inflections
    ("kid", "The kids play."),
    ("dog", "DOGS bark."),                             # case
    ("couch", "a cat on the couch."),                  # punctuation attached
])
def test_a_concept_in_any_inflection_is_covered(concept, sentence):
    assert driver.concept_coverage([concept], sentence) == 1.0


@pytest.mark.parametrize("concept,sentence", [
    ("stand", "The standard was high."),               # not a form of the word, though it starts with it
    ("stand", "I understood."),                        # contains "stood"
    ("cat", "The cathedral is old."),                  # contains the word
    ("sit", "A seat by the window."),                  # a related word is not the word
    ("surf", "The surfer waits."),                     # a derived noun is another lemma (as spaCy's)
    ("mouse", "The mousetrap."),
    ("dog", ""),
])
def test_other_words_do_not_cover_a_concept(concept, sentence):
    assert driver.concept_coverage([concept], sentence) == 0.0


def test_coverage_is_the_share_of_the_set():
    assert driver.concept_coverage(["field", "look", "stand"], "I stood and looked at the sky.") == pytest.approx(2 / 3)
    assert driver.concept_coverage(["dog", "frisbee", "catch"], "A dog caught the frisbee.") == 1.0


def test_prompt_concepts():
    assert driver.prompt_concepts("generate a sentence with: dog ball park.") == ["dog", "ball", "park"]
    with pytest.raises(ValueError, match="not a CommonGen prompt"):
        driver.prompt_concepts("summarize: dog ball park.")


def test_generation_metrics_of_a_file():
    rows = [{"prompt": "generate a sentence with: dog ball park.", "continuation": " A dog ran to the ball.",
             "references": ["The dog runs after a ball in the park.", "A dog plays ball."]},
            {"prompt": "generate a sentence with: cat couch sit.", "continuation": " The cat sat on a couch today.",
             "references": ["A cat sits on the couch."]},
            {"prompt": "generate a sentence with: cat couch sit.", "continuation": "\n\nThe sentence: cat sits.",
             "references": ["A cat sits on the couch."]}]
    result = driver.generation_metrics(rows)
    assert result["coverage"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert result["length"] == pytest.approx((6 + 7 + 4) / 3)  # PTB words, the punctuation dropped
    assert result["direct"] == pytest.approx(2 / 3)  # the third one starts on a new line
    # distinct-2: 14 bigrams in the first two ("a dog ... ball ." and "the cat ... today ."), all different, and
    # 5 in the third ("the sentence : cat sits ."), "the sentence" / "sentence :" / ": cat" / "cat sits" / "sits ."
    assert result["distinct_2"] == pytest.approx(1.0)
    continuations, references = [r["continuation"] for r in rows], [r["references"] for r in rows]
    assert result["cider_d"] == pytest.approx(statistics.mean(metrics.cider_d(continuations, references)))
    assert result["rouge_L"] == pytest.approx(metrics.rouge(continuations, references)["rouge_L"])
    assert result["bleu_4"] == pytest.approx(metrics.bleu_4(continuations, references))


def test_beats_needs_more_than_the_spreads_combined():
    # stdev([1.0, 1.2]) = stdev([0.6, 0.8]) = 0.1414: the gap 0.4 > 0.283
    assert driver.beats([1.0, 1.2], [0.6, 0.8]) == "beats"
    assert driver.beats([0.6, 0.8], [1.0, 1.2]) == "loses to"
    # gap 0.25 < 0.283: a tie, though one mean is higher
    assert driver.beats([0.95, 1.15], [0.7, 0.9]) == "ties with"
    assert driver.beats([1.0], [0.9]) == "beats"  # one seed: no spread


def driver_command(assets, tmp_path, name, *flags):
    """Tiny models and data under tmp_path, and the driver's command line on them: (work dir, out, argv)."""
    # a tiny GPT-2 whose text varies (the default init repeats one token), so the metrics are not all 0
    save_tiny_causal_lm(tmp_path / "models" / "smollm2-135m", assets["tokenizer"], initializer_range=0.5)
    (tmp_path / "data").mkdir()
    os.symlink(assets["data"]["commongen"], tmp_path / "data" / "commongen")
    work, out = tmp_path / "work", tmp_path / "results" / name
    argv = ["--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"), "--work-dir", str(work),
            "--records-dir", str(tmp_path / "records"),
            "--out", str(out), "--heldout-sets", "3", "--num-eval-prompts", "3", "--batch-size", "4",
            "--num-minibatches", "2", "--update-epochs", "1", "--eval-every", "1", "--sl-steps", "2",
            "--sl-batch-size", "4", "--sl-eval-every", "1", "--max-new-tokens", "6", *flags]
    return work, out, argv


def run_driver(argv):
    """The driver's main, as `python benchmarks/commongen_offline.py ARGV` runs it (it records sys.argv)."""
    old_argv, sys.argv = sys.argv, ["commongen_offline.py", *argv]
    try:
        driver.main(driver.tyro.cli(driver.Args, args=argv))
    finally:
        sys.argv = old_argv


@pytest.mark.slow
def test_the_driver_end_to_end(assets, tmp_path):
    """Tiny models, 2 seeds, the weak start with PPO and PPO++ (tril's SL start is the same code with another
    starting model): the table's rows and seeds are those the runs wrote (their generations files and
    TensorBoard events)."""
    work, out, argv = driver_command(assets, tmp_path, "cg", "--starts", "weak", "--weak-methods", "ppo",
                                     "ppo_plus_plus", "--num-iterations", "2", "--seeds", "1", "2")
    run_driver(argv)
    record = json.loads(out.with_suffix(".json").read_text())
    runs = record["runs"]
    expected = {"zero_shot", "sl"} | {f"{start}_{method}_seed{seed}" for start, method in
                                      (("weak", "ppo"), ("weak", "ppo_plus_plus")) for seed in (1, 2)}
    assert set(runs) == expected
    # the held-out part: the last 3 dev sets, none of the pilot part
    dev = [json.loads(line) for line in open(os.path.join(assets["data"]["commongen"], "validation.jsonl"))]
    heldout = [json.loads(line) for line in open(work / "data" / "test.jsonl")]
    assert [r["concepts"] for r in heldout] == [r["concepts"] for r in dev[-3:]]
    table = out.with_suffix(".md").read_text()
    for name, run in runs.items():
        kept = f"{name}_eval" if name in ("zero_shot", "sl") else name  # the evaluation runs of the two models
        generations = driver.run_files.load(tmp_path / "records", kept)["generations"]
        assert [driver.prompt_concepts(g["prompt"]) for g in generations] == [r["concepts"] for r in heldout]
        assert driver.generation_metrics(generations) == pytest.approx({k: run[k] for k in driver.generation_metrics(generations)})
        if name in ("zero_shot", "sl"):
            continue
        folder = work / name
        events = read_tensorboard(folder)
        assert run["curve"] == [[e.step, pytest.approx(e.value)] for e in events.Scalars("eval/cider_d")]
        assert run["seed"] == int(name[-1]) and f"--seed {run['seed']}" in " ".join(driver.run_files.load(tmp_path / "records", name)["command"])
        assert len(run["curve"]) == 3 and run["curve"][-1][0] == 8  # start, iteration 1, the end: 2 x 4 episodes
        # the run's own last generations file is the one its compact file keeps (scores to 7 digits)
        [last] = sorted(folder.glob("runs/*/generations/*.jsonl"))[-1:]
        written = [json.loads(line) for line in open(last)]
        assert [{**g, "score": pytest.approx(g["score"], rel=1e-6)} for g in written] == generations
        assert events.Scalars("eval/cider_d")[-1].value == pytest.approx(run["cider_d"], abs=1e-4)
        if "ppo_plus_plus" in name:  # the guided runs' diagnostics are their own logs
            restart = [e.value for e in events.Scalars("guide/explained_variance_restart")]
            assert run["ev_restart_last"] == pytest.approx(statistics.mean(restart[-3:]), rel=1e-6, abs=1e-6)  # (float32)
            if "guide/score_unmixed" in events.Tags()["scalars"]:
                unmixed = {e.step: e.value for e in events.Scalars("guide/score_unmixed")}  # 2 iterations: quarters of 1
                assert (run["unmixed_first"], run["unmixed_last"]) == pytest.approx((unmixed.get(4), unmixed.get(8)))
        # the critic pilot's setting, the driver's defaults, reach every method's script
        command = " ".join(driver.run_files.load(tmp_path / "records", name)["command"])
        assert all(flag in command for flag in ("--clip-coef-value None", "--critic-anneal-lr False",
                                                "--critic-warmup-iterations 2", "--critic-learning-rate 0.0003"))
        assert "--advantage-estimator gae --samples-per-prompt 1" in command  # (PPO's and PPO++'s: the driver's)
    # each table row is the mean of its seeds' runs
    for start, method in (("weak", "ppo"), ("weak", "ppo_plus_plus")):
        values = [runs[f"{start}_{method}_seed{seed}"]["coverage"] for seed in (1, 2)]
        row = next(line for line in table.split(f"## {driver.START_TITLES[start]}")[1].splitlines()
                   if line.startswith(f"| {driver.LABELS[method]} | "))
        mean, spread = (float(x) for x in re.match(r"\| [^|]+ \|[^|]+\|[^|]+\|[^|]+\| ([\d.]+) ± ([\d.]+) \|", row).groups())
        assert mean == pytest.approx(statistics.mean(values), abs=1e-3)
        assert spread == pytest.approx(statistics.stdev(values), abs=1e-3)
    assert out.with_suffix(".png").stat().st_size > 10_000
    # a second invocation, the runs' folders gone (as in a fresh clone: only the compact files are committed),
    # reuses every finished run from its compact file, writes the same table and keeps the notes
    before = {p: p.stat().st_mtime for p in (tmp_path / "records").glob("*.json")}
    assert {p.stem for p in before} == {"sl", "zero_shot_eval", "sl_eval"} | set(runs) - {"zero_shot", "sl"}
    shutil.rmtree(work)
    out.with_suffix(".md").write_text(table + "What it shows: nothing, on tiny models.\n")
    run_driver(argv)
    assert {p: p.stat().st_mtime for p in (tmp_path / "records").glob("*.json")} == before
    assert not (work / "sl").exists()
    again = out.with_suffix(".md").read_text()
    assert again.endswith(driver.NOTES + "\nWhat it shows: nothing, on tiny models.\n")
    strip = lambda text: re.sub(r"This invocation: \d+ min", "", text.partition(driver.NOTES)[0])  # noqa: E731
    assert strip(again) == strip(table)
    # a run still to make whose SL model is gone: one line that says what to do
    (tmp_path / "records" / "weak_ppo_plus_plus_seed2.json").unlink()
    with pytest.raises(SystemExit, match="weak_ppo_plus_plus_seed2 needs .*sl/model, which is gone .*sl.json"):
        run_driver(argv)


@pytest.mark.slow
def test_the_early_start_and_per_method_seeds(assets, tmp_path):
    """The early start: an sft.py checkpoint of --early-steps steps is the RL runs' starting model and its own row;
    --method-seeds gives a method its own seeds; every run records the commit it was made at."""
    work, out, argv = driver_command(assets, tmp_path, "early", "--starts", "early", "--early-methods", "ppo", "dr_po",
                                     "--seeds", "1", "--method-seeds", "dr_po=2,3", "--num-iterations", "1",
                                     "--early-steps", "1", "--sl-eval-prompts", "3", "--side-by-side", "3",
                                     "--no-norm-per-group", "--advantage-estimator", "rloo", "--samples-per-prompt", "2")
    run_driver(argv)
    record = json.loads(out.with_suffix(".json").read_text())
    runs = record["runs"]
    assert set(runs) == {"zero_shot", "sl", "early", "early_ppo_seed1", "early_dr_po_seed2", "early_dr_po_seed3"}
    # the early model: sft.py's 1 step, saved, is what every RL run of the start began from
    early_command = driver.run_files.load(tmp_path / "records", "early1")["command"]
    assert early_command[early_command.index("--max-steps") + 1] == "1"
    for name in ("early_ppo_seed1", "early_dr_po_seed2", "early_dr_po_seed3"):
        command = driver.run_files.load(tmp_path / "records", name)["command"]
        assert command[command.index("--model-name-or-path") + 1] == str(work / "early1" / "model")
        assert command[command.index("--seed") + 1] == name[-1]
        assert ("--no-norm-per-group" in command) == ("dr_po" in name)  # the driver's choice reaches the script
        warmup = len(command) - 1 - command[::-1].index("--critic-warmup-iterations")  # (the last one given)
        assert command[warmup + 1] == "0" and "--advantage-estimator rloo --samples-per-prompt 2" in " ".join(command)
        assert runs[name]["equal_groups"] >= 0 and "ev_last" not in runs[name]  # 2 samples a prompt, no critic
        assert runs[name]["commit"] == record["command"].rpartition("`")[2] or runs[name]["commit"] in record["command"]
    # its row is its own evaluation; the pilot numbers it was picked on are its sft run's last evaluation
    early_rows = driver.run_files.load(tmp_path / "records", "early1_eval")["generations"]
    assert runs["early"]["cider_d"] == pytest.approx(driver.generation_metrics(early_rows)["cider_d"])
    [pilot_file] = sorted((work / "early1").glob("runs/*/generations/*.jsonl"))[-1:]
    pilot_rows = [json.loads(line) for line in open(pilot_file)]
    assert runs["early"]["pilot"] == pytest.approx(driver.generation_metrics(pilot_rows))
    table = out.with_suffix(".md").read_text()
    assert f"## {driver.START_TITLES['early']}" in table and "| Early SL checkpoint (the start) | " in table
    assert "DR-PO (PPO++, references as guide) 2, 3" in table
    per_seed = [line for line in table.splitlines() if line.startswith("| DR-PO (PPO++, references as guide) | ")]
    assert [line.split(" | ")[1] for line in per_seed[1:]] == ["2", "3"]  # the first is the mean row
    assert all(re.search(r"\| [\d.]+ / [\d.–]+ / [\d.–]+ \| [-\d.–]+ \|$", line) for line in per_seed[1:])  # groups


def test_method_seeds_must_name_a_method(tmp_path):
    with pytest.raises(SystemExit, match="--method-seeds"):
        driver.main(driver.Args(method_seeds=["ppo_plus=1,2"], work_dir=str(tmp_path)))


def test_a_run_without_a_critic_has_its_diagnostics_and_its_row():
    """rloo runs log no explained variance: their diagnostics leave it out, and the table's cell is a dash."""
    scalars = {"policy/approxkl_avg": [(8, 0.01)], "policy/clipfrac_avg": [(8, 0.1)], "objective/kl": [(8, 0.2)],
               "objective/scores": [(4, 0.5), (8, 0.6)]}
    result = driver.diagnostics(scalars)
    assert "ev_last" not in result and result["train_score_last"] == 0.6
    assert driver.diagnostics({**scalars, "val/explained_variance": [(4, 0.1), (8, 0.3)]})["ev_last"] == pytest.approx(0.2)
    # a prompt's samples: the share of groups of equal scores and the k-score correlation, each a mean over the run
    groups = driver.diagnostics({**scalars, "val/equal_score_groups": [(4, 0.25), (8, 0.75)],
                                 "guide/equal_score_groups_mixed": [(4, 1.0), (8, 0.5)],
                                 "guide/k_score_correlation": [(4, 0.2), (8, 0.4)]})
    assert groups["equal_groups"] == 0.5 and groups["equal_mixed"] == 0.75 and "equal_unmixed" not in groups
    assert groups["k_corr"] == pytest.approx(0.3) and "equal_groups" not in result


def test_the_training_reward_by_quarter_of_the_run():
    """first → last: the means over the first and last quarter of the iterations (by objective/scores, logged every
    iteration); the unmixed episodes' reward skips iterations that had none, and a quarter with none is None."""
    scores = [(4 * i, float(i)) for i in range(1, 9)]  # 8 iterations of 4 episodes: quarters of 2
    unmixed = [(4, 10.0), (8, 20.0), (16, 30.0), (32, 40.0)]  # none in iterations 3, 5, 6, 7
    scalars = {"objective/scores": scores, "guide/score_unmixed": unmixed}
    assert driver.quarters(scalars, "objective/scores") == [1.5, 3.5, 5.5, 7.5]
    assert driver.quarters(scalars, "guide/score_unmixed") == [15.0, 30.0, None, 40.0]
    assert driver.quarter_means(scalars, "guide/score_unmixed") == (15.0, 40.0)
    assert driver.quarters({"objective/scores": scores[:2]}, "objective/scores") == [1.0, 2.0]  # one iteration each
    assert driver.quarters({"objective/scores": scores[:5]}, "objective/scores") == [1.5, 3.0, 4.0, 5.0]  # 5: 2+1+1+1
    assert driver.quarters({"objective/scores": scores[:7]}, "objective/scores") == [1.5, 3.5, 5.5, 7.0]  # 7: 2+2+2+1
    result = driver.diagnostics(scalars | {"policy/approxkl_avg": [(4, 0.0)], "policy/clipfrac_avg": [(4, 0.0)],
                                           "objective/kl": [(4, 0.0)]})
    assert (result["train_score_first"], result["train_score_last"]) == (1.5, 7.5)
    assert (result["unmixed_first"], result["unmixed_last"]) == (15.0, 40.0)
