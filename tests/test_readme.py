"""The README's multi-process commands run as written (read from README.md), on 2 CPU processes
(gloo; DeepSpeed with DS_ACCELERATOR=cpu), for 2 steps on the default corpus: the shipped configs
work under DDP and ZeRO-3 with the settings the commands give."""
import os
import subprocess
import sys

import pytest
import torch

from readme_commands import readme_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # torchrun and deepspeed: this Python's own launchers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    data = tmp_path_factory.mktemp("readme") / "pretrain"
    r = subprocess.run([sys.executable, "data.py", "--out", str(data)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return data


def run_for_two_steps(argv, corpus, out_dir):
    """argv as the README writes it, with its --set list extended: 2 steps, the test's folders."""
    assert argv[-1].startswith("out_dir=") and "--set" in argv, argv
    argv = [os.path.join(BIN, argv[0]), *argv[1:-1], f"out_dir={out_dir}", f"data_dir={corpus}", "max_iters=2",
            "eval_interval=2", "eval_iters=1", "log_interval=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_the_readme_ddp_command_runs_with_the_shipped_configs(corpus, tmp_path):
    argv = readme_command("torchrun --standalone")
    r = run_for_two_steps(argv, corpus, tmp_path / "ddp")
    assert "world 2" in r.stdout and "step 2/2" in r.stdout
    ck = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    # the batch of one process: 8 sequences on each of 2 ranks = config/pretrain.json's 16
    assert ck["train_config"]["batch_size"] * ck["train_config"]["grad_accum"] == 16


def test_the_readme_deepspeed_command_runs_with_the_shipped_configs(corpus, tmp_path):
    argv = readme_command("deepspeed --num_gpus 2")
    r = run_for_two_steps(argv, corpus, tmp_path / "ds")
    assert "step 2/2" in r.stdout
    assert (tmp_path / "ds" / "ds").is_dir() and (tmp_path / "ds" / "last.pt").is_file()
    # and the README's consolidation command, on that folder
    argv = readme_command("python train_ds.py --consolidate")
    r = subprocess.run([sys.executable, argv[1], argv[2], str(tmp_path / "ds"), argv[4], str(tmp_path / "c.pt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(tmp_path / "c.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ds" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_shipped_config_alone_names_both_ways_out(corpus, tmp_path):
    """Without the --set the README gives, the error says what to set (and keeps the batch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", "train_ddp.py", "-m",
                        "config/model.json", "-t", "config/pretrain.json", "--set", f"data_dir={corpus}",
                        f"out_dir={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert ("grad_accum (1) must be a multiple of the number of processes (2), which share each step's micro-batches: "
            "--set batch_size=8 grad_accum=2 keeps the batch of one process (16 sequences a step); --set grad_accum=2 "
            "makes the batch 2 times larger") in r.stderr


def test_the_readme_run_runs_every_command_but_the_placeholders():
    """tests/readme_run.py (CI: --quick) leaves out only lines with "..." placeholders (several machines)."""
    from readme_commands import bash_lines, strip_comment
    from readme_run import Runner
    lines = [line for _, line in bash_lines()]
    left_out = [line for line in lines if Runner.skip_reason(line)]
    assert left_out and all(" -m ... -t ..." in line for line in left_out)
    assert all(line.startswith(("torchrun --nnodes", "deepspeed --hostfile")) for line in left_out)
    assert len(lines) > 40 and "python data.py" in lines
    assert strip_comment('python x.py --prompt "a # b"   # a comment') == 'python x.py --prompt "a # b"   '
