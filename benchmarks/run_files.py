"""One compact file per finished run, committed beside the tables it feeds, in place of its folder (log, TensorBoard
events, every evaluation's generations, models), which stays in the driver's --work-dir and is not committed.

    {records_dir}/{run}.json            the command, wall time and commit; the scalar series the tables and
                                        pictures read; the last evaluation's continuations and scores
    {records_dir}/eval_sets/{id}.jsonl  the prompts and references of an evaluated set, once for every run
                                        that evaluated it (id: the first 12 hex digits of its sha256)

A driver reuses a run whose file holds the same command (run_once), and rebuilds its tables from these files alone.
"""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KEPT_TAGS = ("eval/", "objective/scores", "objective/kl", "policy/approxkl_avg", "policy/clipfrac_avg",
             "val/explained_variance", "val/equal_score_groups", "guide/mixed_fraction", "guide/score_",
             "guide/explained_variance_restart", "guide/advantage_unmixed", "guide/equal_score_groups_",
             "guide/k_score_correlation")
"""the scalars a table, its diagnostics or its picture reads (a tag, or a prefix ending in / or _)"""


def read_events(folder):
    """{tag: [(step, value), ...]} of the TensorBoard events under a run's folder (runs/<run name>/)."""
    [events_dir] = glob.glob(os.path.join(folder, "runs", "*"))
    events = EventAccumulator(events_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def rounded(value):
    """The shortest decimal that reads back as the same float32: TensorBoard's scalars are float32, so they lose
    nothing; the generations' scores keep float32's 7 digits."""
    return float(str(np.float32(value)))


def kept(tag):
    return any(tag == t or (t.endswith(("/", "_")) and tag.startswith(t)) for t in KEPT_TAGS)


def last_generations(folder):
    """The rows (prompt, continuation, references, score) of the run's last evaluation, from its folder (none for a
    run that did not evaluate, e.g. sft.py --eval-every 0)."""
    files = sorted(glob.glob(os.path.join(folder, "runs", "*", "generations", "*.jsonl")))
    if not files:
        return []
    with open(files[-1]) as f:
        return [json.loads(line) for line in f]


def write(records_dir, name, command, seconds, commit, folder):
    """{records_dir}/{name}.json from the finished run's folder; returns the record (as load() reads it)."""
    scalars = {tag: series for tag, series in sorted(read_events(folder).items()) if kept(tag)}
    return write_record(records_dir, name, command, seconds, commit, scalars, last_generations(folder))


def write_record(records_dir, name, command, seconds, commit, scalars, rows):
    """{records_dir}/{name}.json: the scalars {tag: [(step, value)]} and the generation rows (prompt, continuation,
    references, score); the rows' prompts and references go to eval_sets/ once."""
    os.makedirs(records_dir, exist_ok=True)
    eval_set = [{"prompt": r["prompt"], "references": r["references"]} for r in rows]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in eval_set)
    set_id = hashlib.sha256(text.encode()).hexdigest()[:12] if rows else None
    set_path = os.path.join(records_dir, "eval_sets", f"{set_id}.jsonl")
    if rows and not os.path.isfile(set_path):
        os.makedirs(os.path.dirname(set_path), exist_ok=True)
        replace_with(set_path, text)
    # one line a scalar series and a generation: a diff of two records reads line by line
    lines = [f' "command": {json.dumps([relative(a) for a in command])},', f' "seconds": {seconds:.1f},',
             f' "commit": {json.dumps(commit)},', f' "eval_set": {json.dumps(set_id)},', ' "scalars": {']
    lines += [f"  {json.dumps(tag)}: {json.dumps([[step, rounded(value)] for step, value in series])},"
              for tag, series in scalars.items()]
    lines[-1] = lines[-1].rstrip(",") if scalars else lines[-1]
    lines += [" },", ' "generations": [']
    lines += [f"  {json.dumps([r['continuation'], rounded(r['score'])], ensure_ascii=False)}," for r in rows]
    lines[-1] = lines[-1].rstrip(",") if rows else lines[-1]
    lines += [" ]"]
    replace_with(os.path.join(records_dir, name + ".json"), "{\n" + "\n".join(lines) + "\n}\n")
    return load(records_dir, name)


def replace_with(path, text):
    """Write the file whole or not at all (an interrupted driver leaves no half record)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def load(records_dir, name):
    """The run's record: its name, command, seconds, commit, scalars {tag: [(step, value)]} and generations, the
    rows (prompt, continuation, references, score) of its last evaluation; None if it has none."""
    path = os.path.join(records_dir, name + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    eval_set = []
    if record["eval_set"] is not None:
        set_path = os.path.join(records_dir, "eval_sets", record["eval_set"] + ".jsonl")
        if not os.path.isfile(set_path):
            raise SystemExit(f"error: {path} evaluated the prompts of {set_path}, which is missing (commit the two "
                             f"together; or delete {path} to make the run again)")
        with open(set_path) as f:
            eval_set = [json.loads(line) for line in f]
    record["name"] = name
    record["scalars"] = {tag: [tuple(point) for point in series] for tag, series in record["scalars"].items()}
    record["generations"] = [dict(prompt=s["prompt"], continuation=c, references=s["references"], score=score)
                             for s, (c, score) in zip(eval_set, record["generations"], strict=True)]
    return record


DEFAULTS = {("--advantage-estimator", "gae"), ("--samples-per-prompt", "1")}
"""flags given their scripts' default value, which runs made before the flags existed did not pass"""


def relative(arg):
    """A path inside the repository, relative to its root (a record holds no checkout's own paths); else arg."""
    inside = os.path.isabs(arg) and not os.path.relpath(arg, ROOT).startswith("..")
    return os.path.relpath(arg, ROOT) if inside else arg


def portable(command):
    """The command's arguments made relative() and the DEFAULTS pairs left out: what two commands are compared by."""
    parts = [relative(a) for a in command]
    kept, i = [], 0
    while i < len(parts):
        if tuple(parts[i : i + 2]) in DEFAULTS:
            i += 2
            continue
        kept.append(parts[i])
        i += 1
    return kept


def finished(records_dir, name, command):
    """The run's record if it finished with this command (a reused run), else None."""
    record = load(records_dir, name)
    return record if record is not None and portable(record["command"]) == portable(command) else None


def commit_of_code():
    """`git describe --always --dirty` of the checkout the runs are made from."""
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "unknown"


def run(jobs, work_dir):
    """Run (name, script, args) jobs side by side, each in its own folder (log + runs/) with an equal share of
    the cores (OMP_NUM_THREADS, when set, is kept: two drivers side by side); return their wall times. A failure
    stops the driver with the end of its log."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // len(jobs)))
    processes = []
    for name, script, script_args in jobs:
        folder = os.path.join(work_dir, name)
        shutil.rmtree(os.path.join(folder, "runs"), ignore_errors=True)  # a re-run replaces the old events
        os.makedirs(folder, exist_ok=True)
        log = open(os.path.join(folder, "log.txt"), "w")
        processes.append((name, log, subprocess.Popen([sys.executable, os.path.join(ROOT, script), *script_args],
                                                       cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                                       env=os.environ | {"OMP_NUM_THREADS": threads})))
    start, seconds = time.perf_counter(), []
    for name, log, process in processes:
        process.wait()
        log.close()
        seconds.append(time.perf_counter() - start)
        if process.returncode != 0:
            with open(os.path.join(work_dir, name, "log.txt")) as f:
                tail = f.read()[-2000:]
            raise SystemExit(f"error: {name} failed (exit {process.returncode}); its log ends:\n{tail}")
    return seconds


def run_once(jobs, work_dir, records_dir, side_by_side, on_done=None):
    """Run the (name, script, args) jobs that have no compact file with the same command, side_by_side at a time in
    work_dir, and write each one's file as it finishes (on_done(name, seconds) after each); return every job's
    record. A model that an earlier job made in work_dir (--model-name-or-path, --guide-model) and a job still to
    run needs must still be there: it is not committed."""
    todo = [(name, script, script_args) for name, script, script_args in jobs
            if not finished(records_dir, name, [script, *script_args])]
    work_dir = os.path.abspath(work_dir)
    for name, _, script_args in todo:
        for flag, value in zip(script_args, script_args[1:]):
            if flag not in ("--model-name-or-path", "--guide-model") or not os.path.isabs(value):
                continue  # (a hub id, or a model of the user's own)
            inside = os.path.commonpath([value, work_dir]) == work_dir and value != work_dir
            maker = os.path.relpath(value, work_dir).split(os.sep)[0]
            if inside and not os.path.isfile(os.path.join(value, "config.json")):
                raise SystemExit(f"error: {name} needs {value}, which is gone (models are not committed; it was "
                                 f"made by {os.path.join(records_dir, maker + '.json')}: delete that file to make it "
                                 f"again)")
    commit = commit_of_code()
    for group in range(0, len(todo), side_by_side):
        batch = todo[group : group + side_by_side]
        for (name, script, script_args), seconds in zip(batch, run(batch, work_dir)):
            write(records_dir, name, [script, *script_args], seconds, commit, os.path.join(work_dir, name))
            if on_done:
                on_done(name, seconds)
    return [load(records_dir, name) for name, _, _ in jobs]
