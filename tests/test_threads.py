"""train.cpu_threads: torch's CPU threads come from what the cores do now (/proc/stat), not from the
load average, which still counts a job that has just ended."""
import os
import subprocess
import sys
import time

import pytest

import train

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc/stat only")


def spin_on(cpu):
    """A process that keeps one CPU busy."""
    return subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])


def test_a_core_kept_busy_counts_as_busy_and_idle_time_does_not():
    cpus = sorted(os.sched_getaffinity(0))
    spinner = spin_on(cpus[0])
    try:
        time.sleep(0.5)
        assert train.busy_cores({cpus[0]}) > 0.8
    finally:
        spinner.kill()
        spinner.wait()


def test_every_core_busy_gives_one_thread(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spinners = [spin_on(c) for c in sorted(os.sched_getaffinity(0))]
    try:
        time.sleep(0.5)
        assert train.cpu_threads() == 1
    finally:
        for s in spinners:
            s.kill()
            s.wait()


def test_the_load_average_is_not_consulted(monkeypatch):
    """A job that ended a moment ago still weighs on the 1-minute load average (a previous run, back to
    back); the choice must not read it where /proc/stat says what is busy now."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def load_average():
        raise AssertionError("cpu_threads read the load average")
    monkeypatch.setattr(os, "getloadavg", load_average)
    assert 1 <= train.cpu_threads() <= len(os.sched_getaffinity(0))


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import torch
    assert train.cpu_threads() == torch.get_num_threads()


def test_a_gpu_run_does_not_wait_to_measure_the_cores(monkeypatch):
    """On a GPU the quarter-second /proc/stat measurement only delays the start-up: the load average
    decides (every core busy by it gives one thread; an idle machine every core)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def measure(*args, **kwargs):
        raise AssertionError("a GPU run measured the cores")
    monkeypatch.setattr(train, "busy_cores", measure)
    cores = len(os.sched_getaffinity(0))
    for device in ("cuda", "cuda:1", "mps"):
        monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))
        assert train.cpu_threads(device) == 1
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert train.cpu_threads(device) == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    with pytest.raises(AssertionError, match="measured the cores"):
        train.cpu_threads("cpu")  # the CPU still measures
