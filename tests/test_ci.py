"""CI runs every test: under CI=true a skip fails (tests/conftest.py), except a GPU test's."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TESTS = '''
import pytest

def test_needs_a_tool():
    pytest.skip("no C compiler")

@pytest.mark.skipif(True, reason="GPU-only path: run on a CUDA machine")
def test_on_a_gpu():
    pass

def test_needs_capability():
    pytest.skip("float8 products need compute capability 8.9+")

@pytest.mark.xfail(reason="a known failure", strict=True)
def test_known_failure():
    assert False

def test_runs():
    pass
'''


def run_pytest(tmp_path, ci):
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_demo.py").write_text(TESTS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfs",
                           "test_demo.py"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)


def test_under_ci_a_skip_fails_unless_it_is_a_gpu_test(tmp_path):
    r = run_pytest(tmp_path, ci=True)
    assert r.returncode == 1, r.stdout
    summary = r.stdout.splitlines()[-1]
    assert "1 failed" in summary and "1 passed" in summary and "2 skipped" in summary and "1 xfailed" in summary
    assert "FAILED test_demo.py::test_needs_a_tool - skipped under CI=true" in r.stdout and "no C compiler" in r.stdout


def test_outside_ci_skips_stay_skips(tmp_path):
    r = run_pytest(tmp_path, ci=False)
    assert r.returncode == 0 and "3 skipped" in r.stdout.splitlines()[-1], r.stdout
