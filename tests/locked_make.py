"""`make` for the tests, one at a time across test processes.

pytest-xdist runs test files in parallel processes (pytest.ini), and several files build the same
targets (infer_c/infer, infer_c/libnano.so): two makes writing one binary at once would leave a
half-written file for a third test to run. A lock file serialises them; once a target is built,
the others' makes find it up to date.
"""
import fcntl
import hashlib
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(tempfile.gettempdir(), f"nano-make-{hashlib.sha1(ROOT.encode()).hexdigest()[:12]}.lock")


def make(*args):
    """subprocess.run(["make", *args]) under the checkout's build lock (output captured, as text)."""
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return subprocess.run(["make", *args], capture_output=True, text=True)
