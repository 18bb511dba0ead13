"""A full disk, for real: a subprocess whose files may not grow past a few bytes (RLIMIT_FSIZE; Python ignores
SIGXFSZ, so the kernel's EFBIG reaches the writer as it would ENOSPC), writing with the real libraries (torch.save,
safetensors, save_pretrained). Each write ends in one line, the last good files untouched, nothing half-written
left where it could be taken for a whole file."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections import namedtuple

import pytest
import torch

from common import checkpoint
from conftest import ROOT, run_script_in_process, set_flags, sft_args, task_args
from test_distributed import torchrun

pytestmark = pytest.mark.slow  # real processes under a file-size limit: the slow tier

PRELUDE = f"""
import os, resource, sys, torch
sys.path.insert(0, {ROOT!r})
from common import checkpoint

def limit(size):  # from here on no file of this process may grow past `size` bytes
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
"""


def run(code, cwd):
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_a_checkpoint_that_does_not_fit_keeps_the_last_good_one(tmp_path):
    """The weights fit, the optimizer's state does not: torch.save, writing to a path, raised a RuntimeError ("basic_ios
    ::clear: iostream error"), which once ended in a traceback with the half-written folder left beside the
    checkpoint; written through a Python file, the line says what the OS said (EFBIG: "File too large")."""
    result = run("""
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        checkpoint.save("ck", {"policy": model}, optimizer, {"iteration": 1})
        limit(1024)  # the weights (208 bytes) fit, the optimizer's state (3 KB) does not
        optimizer.step()
        checkpoint.save("ck", {"policy": model}, optimizer, {"iteration": 2})
    """, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: cannot write the checkpoint ck (File too large); the previous one is kept in ck"]
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no ck.tmp, no ck.old
    assert json.load(open(tmp_path / "ck" / "state.json")) == {"iteration": 1}
    assert sorted(os.listdir(tmp_path / "ck")) == ["optimizer.pt", "policy.safetensors", "state.json"]


def test_a_saved_model_that_does_not_fit_leaves_nothing_half_written(tmp_path):
    """--save-model: save_pretrained raises safetensors' SafetensorError on a full disk (not an OSError); the
    folder the model goes to keeps what it held (here an earlier file), and no partial weights are left there."""
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "earlier.txt").write_text("kept")
    result = run("""
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                                bos_token_id=0, eos_token_id=0))
        limit(4096)  # its config fits, its weights do not
        with checkpoint.writing("the policy to", "saved") as folder:
            model.save_pretrained(folder)
    """, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # (after transformers' progress bar)
    assert line.startswith("error: cannot write the policy to saved: ") and line.endswith(
        "File too large (os error 27); nothing was written there"), line
    assert sorted(os.listdir(tmp_path)) == ["saved"] and os.listdir(tmp_path / "saved") == ["earlier.txt"]


def test_a_saved_model_that_fits_is_moved_in_whole(tmp_path):
    result = run("""
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                                bos_token_id=0, eos_token_id=0))
        with checkpoint.writing("the policy to", "saved") as folder:
            model.save_pretrained(folder)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["saved"]
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "saved"))


def mount_tmpfs(path, size):
    """A real small filesystem at `path`, where this process may mount one (as root): True; else False."""
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_under_tensorboard_stops_the_run_with_one_line(assets, tmp_path):
    """TensorBoard's writer raises OSError from a later call than the write that failed (it writes in a thread),
    which once ended the run in a traceback. On a real 8 KiB filesystem holding runs/ (the checkpoints elsewhere):
    the run stops at the end of an iteration, as on Ctrl-C, with its checkpoint and the command that resumes.
    Where no filesystem can be mounted, every file is capped at 8 KiB (RLIMIT_FSIZE) under --save-every 0: the
    failure ends the run with one line."""
    args = set_flags(task_args(assets, "imdb"), "--total-episodes", 40, "--eval-every", 0, "--save-every", 1)
    small = tmp_path / "small"
    mounted = mount_tmpfs(small, "8k")
    try:
        if mounted:
            (tmp_path / "runs").symlink_to(small)
            command = [sys.executable, os.path.join(ROOT, "ppo.py"), *args]
        else:
            code = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192)); "
                    f"sys.path.insert(0, {ROOT!r}); "
                    f"sys.argv = {['ppo.py', *set_flags(args, '--save-every', 0)]!r}; "
                    f"runpy.run_path({os.path.join(ROOT, 'ppo.py')!r}, run_name='__main__')")
            command = [sys.executable, "-c", code]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        if mounted:
            subprocess.run(["umount", str(small)])
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    if mounted:
        assert "stopped by an error writing TensorBoard's log runs/" in lines[-2] and "(No space left on device) " \
            "after iteration " in lines[-2] and "; checkpoint: checkpoints/" in lines[-2], lines
        assert lines[-1].startswith("resume with: ") and "/10; checkpoint" in lines[-2]
        [folder] = os.listdir(tmp_path / "checkpoints")
        state = json.load(open(tmp_path / "checkpoints" / folder / "state.json"))
        assert f"after iteration {state['iteration']}/10;" in lines[-2]
    else:
        assert len(lines) == 1 and "an error writing TensorBoard's log runs/" in lines[0] and "(File too large)" in \
            lines[0], lines  # (at the end of an iteration, or at the run's end if the writer held it till then)


@pytest.mark.parametrize("script", ["ppo.py", "d2lols.py"])
def test_a_checkpoint_that_fails_on_rank_0_under_ddp_stops_every_rank_at_once(assets, tmp_path, script):
    """2 processes, the checkpoint folder on a real 8 KiB filesystem (else rank 0's files capped at 1 KiB from its
    first save on): rank 0's save fails. Every rank stops at once, rank 0 with its one line, nothing half-written
    left; rank 1 once waited at the barrier after the save for a rank that had gone, until the launcher killed it
    (torchrun) or the process group timed out (a launcher that does not)."""
    args = set_flags(task_args(assets, "imdb", script), "--batch-size", 8, "--total-episodes", 16, "--eval-every", 0,
                     "--save-every", 1, "--checkpoint-dir", "small/ck", "--process-group-timeout", 1)
    small = tmp_path / "small"
    mounted = mount_tmpfs(small, "8k")
    try:
        result = torchrun(script, args, tmp_path, env={"EXIT_TIMES": "1",
                                                        **({} if mounted else {"FILE_SIZE_LIMIT_AT_SAVE": "1024"})})
    finally:
        if mounted:
            subprocess.run(["umount", str(small)])
    assert result.returncode != 0
    assert "error: cannot write the checkpoint small/ck (" in result.stderr, result.stderr[-3000:]
    assert "there is no previous one" in result.stderr, result.stderr[-3000:]
    # rank 1 stopped on its own, at once: not with gloo's error from the collective rank 0 left (nor a timeout)
    assert "[rank1]: Traceback" not in result.stderr and "Timeout" not in result.stderr, result.stderr[-3000:]
    exits = [float((tmp_path / f"exit_rank{rank}.txt").read_text()) for rank in (0, 1)]
    assert abs(exits[1] - exits[0]) < 5, exits
    assert not os.path.exists(small / "ck.tmp") and not os.path.exists(small / "ck")


def small_disk(path, size, monkeypatch, used=0):
    """`path` on a real filesystem of `size` bytes; where none can be mounted, the disk's free space reported as
    `size` less the `used` bytes the test will write there (shutil.disk_usage)."""
    if mount_tmpfs(path, size):
        return True
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage(size, used, size - used))
    return False


@pytest.mark.parametrize("size, present, warned", [(1 << 20, 0, True), (4 << 20, 0, False), (2 << 20, 789504, False)])
def test_a_disk_that_cannot_hold_two_checkpoints_is_named_at_start(tmp_path, capsys, monkeypatch, size, present,
                                                                   warned):
    """A 256x256 linear layer: 0.75 MiB a checkpoint (weights and AdamW's two moments). 1 MiB holds one, not the
    two a save needs for a moment: one line; 4 MiB: nothing; 2 MiB holding the run's checkpoint already (a resume):
    its 1.25 MiB free hold the next one, nothing."""
    model = torch.nn.Linear(256, 256)
    mounted = small_disk(tmp_path / "small", size, monkeypatch, used=present)
    try:
        if present:
            (tmp_path / "small" / "ck").mkdir()
            (tmp_path / "small" / "ck" / "policy.safetensors").write_bytes(b"0" * present)
        checkpoint.check_room(str(tmp_path / "small" / "ck"), [model])
        line = capsys.readouterr().out
        assert ("warning: --checkpoint-dir " in line and "GiB free, and a checkpoint takes about 0.00 GiB: a save "
                "needs room for 2" in line) == warned, line
    finally:
        if mounted:
            subprocess.run(["umount", str(tmp_path / "small")])


@pytest.mark.parametrize("script", ["sft.py", "ppo.py", "ppo_plus_plus.py", "aggrevated.py", "d2lols.py"])
def test_each_script_says_at_start_when_its_disk_cannot_hold_two_checkpoints(assets, tmp_path, capsys, monkeypatch,
                                                                             script):
    args = sft_args(assets, "imdb", steps=1) if script == "sft.py" else set_flags(
        task_args(assets, "imdb", script), "--total-episodes", 4, "--eval-every", 0)
    args = set_flags(args, "--eval-every", 0, "--save-every", 1, "--checkpoint-dir", "small/ck")
    mounted = small_disk(tmp_path / "small", 8192, monkeypatch)
    try:
        with pytest.raises(SystemExit) if mounted else contextlib.nullcontext():  # (mounted: the save then fails)
            run_script_in_process(script, args, tmp_path)
    finally:
        if mounted:
            subprocess.run(["umount", str(tmp_path / "small")])
    assert "warning: --checkpoint-dir small/ck: 0.00 GiB free, and a checkpoint takes about" in capsys.readouterr().out
