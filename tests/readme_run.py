"""
Run every command the README shows, in order, on a fresh clone in a fresh virtual environment, and
report each one's exit status and time: what a newcomer following the README word for word gets.

    python tests/readme_run.py --quick     # short training runs (CI: .ci/run), ~15-30 min on 2 cores
    python tests/readme_run.py             # the configs as shipped: hours on a 2-core CPU

The commands are read from README.md's ```bash and ```python blocks (tests/readme_commands.py) and
run as written, with these exceptions, each reported:
  * --quick shortens training in the clone's configs (max_iters 4, an eval at 2 and 4) and gives
    problem.py --steps 20 --test-size 200: the commands stay as written;
  * commands with "..." placeholders (several machines) and the test-suite command (CI runs it) are
    not run; `huggingface-cli download` needs the Hub, so a stand-in SmolLM2-shaped model (tiny,
    random, ChatML template, saved by the installed transformers) is written where it would land;
  * REPLs get a prompt on stdin, then end of input; servers (serve.py, infer/serve.py, tensorboard)
    run in the background while the README's client commands for them run, then are stopped;
  * GPU commands (device=cuda; the Benchmarks section's H200 run, whose config replays CUDA graphs)
    must end with train.py's one `error:` line about the GPU on a machine without one.
The inputs the README leaves to the reader (a.txt, b.jsonl, big.jsonl, my_pairs.jsonl) are made
from the built-in corpus first. Exit status 1 if any command fails.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from readme_commands import ROOT, bash_lines  # noqa: E402

QUICK_TRAIN = {"max_iters": 4, "eval_interval": 2, "eval_iters": 1, "log_interval": 1, "warmup_iters": 1}
SERVERS = {"python serve.py": 8000, "python infer/serve.py": 8000, "tensorboard": 6006}


def python_blocks(path=os.path.join(ROOT, "README.md")):
    with open(path, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


class Runner:
    def __init__(self, work, quick, venv_python, only=None):
        self.work, self.quick, self.only = work, quick, only
        self.repo = os.path.join(work, "nano")
        self.home = os.path.join(work, "home")
        bin_dir = os.path.dirname(venv_python)
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "HOME": self.home,
                    "VIRTUAL_ENV": os.path.dirname(bin_dir), "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
        self.env.pop("PYTHONPATH", None)
        self.results = []  # (section, command, status, seconds, note)
        self.servers = []

    def record(self, section, command, status, seconds, note=""):
        self.results.append((section, command, status, seconds, note))
        print(f"[{status:>7}] {seconds:8.1f} s  {section}: {command[:110]}{'  -- ' + note if note else ''}", flush=True)

    def shell(self, command, cwd, stdin=None, timeout=None):
        t0 = time.time()
        r = subprocess.run(["bash", "-c", command], cwd=cwd, env=self.env, input=stdin, capture_output=True,
                           text=True, timeout=timeout)
        return r, time.time() - t0

    # --- setting the scene -------------------------------------------------------------------

    def clone(self):
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.home)
        subprocess.run(["git", "clone", "-q", ROOT, self.repo], check=True)
        shared = os.path.join(os.path.dirname(ROOT), "shared")
        if os.path.isdir(shared):  # ../shared, as every checkout has it (the Benchmarks command reads it)
            os.symlink(shared, os.path.join(self.work, "shared"))
        if self.quick:
            for name in os.listdir(os.path.join(self.repo, "config")):
                path = os.path.join(self.repo, "config", name)
                with open(path) as f:
                    cfg = json.load(f)
                if "max_iters" in cfg:
                    cfg.update({k: min(v, cfg.get(k, v)) for k, v in QUICK_TRAIN.items()})
                    if "target_val_loss" in cfg:
                        cfg["target_val_loss"] = None
                    with open(path, "w") as f:
                        json.dump(cfg, f, indent=1)

    def inputs(self):
        """The files the README's commands name but leave to the reader."""
        code = f"""
import json, sys
sys.path.insert(0, {self.repo!r})
from corpus import default_corpus_documents
docs = list(default_corpus_documents())
open("a.txt", "w").write(docs[0])
open("b.jsonl", "w").write("".join(json.dumps({{"text": d}}) + "\\n" for d in docs[1:40]))
open("big.jsonl", "w").write("".join(json.dumps({{"text": d}}) + "\\n" for d in docs[40:200]))
pairs = [{{"messages": [{{"role": "system", "content": "Answer in one word."}},
                       {{"role": "user", "content": f"Which chapter is this? {{d[:80]}}"}},
                       {{"role": "assistant", "content": f"Chapter {{i}}."}}]}} for i, d in enumerate(docs[:300])]
pairs += [{{"question": f"What follows: {{d[:60]}}", "answer": d[60:120]}} for d in docs[300:600]]
open("my_pairs.jsonl", "w").write("".join(json.dumps(p) + "\\n" for p in pairs))
"""
        r, dt = self.shell(f"python -c {shlex.quote(code)}", self.repo)
        self.record("(setup)", "inputs a.txt b.jsonl big.jsonl my_pairs.jsonl", "ok" if r.returncode == 0 else "FAILED",
                    dt, r.stderr.strip()[-300:])

    def stand_in_hf_model(self):
        """What `huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct` would leave: a Llama
        model directory with a ChatML template, here tiny and random, saved by transformers."""
        code = f"""
import json, sys
sys.path.insert(0, {os.path.join(self.repo, 'tests')!r}); sys.path.insert(0, {self.repo!r})
from corpus import default_corpus_documents
from test_hf import make_hf_model
import transformers
folder = {os.path.join(self.home, 'models', 'smollm2')!r}
make_hf_model(folder, "llama", "chatml", list(default_corpus_documents())[:200], tied=True)
transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # as a download holds them
config = json.load(open(folder + "/config.json"))  # SmolLM2's context (RoPE: no weights depend on it)
config["max_position_embeddings"] = 2048
json.dump(config, open(folder + "/config.json", "w"))
"""
        return self.shell(f"python -c {shlex.quote(code)}", self.repo)

    # --- the commands -----------------------------------------------------------------------

    @staticmethod
    def skip_reason(command):
        if re.search(r"(^|\s)\.\.\.(\s|$)", command):
            return "placeholders (several machines)"
        return None

    def run_command(self, section, command, cwd):
        # the test suite: CI runs it (.ci/run); its install is part of the set-up
        if command.startswith("pip install -r requirements-dev.txt && python -m pytest"):
            r, dt = self.shell("pip install -q -r requirements-dev.txt", cwd)
            self.record(section, "pip install -r requirements-dev.txt", self.status(r), dt, self.tail(r))
            self.record(section, "python -m pytest -q", "skipped", 0, "the test suite: CI runs it (.ci/run)")
            return cwd
        reason = self.skip_reason(command)
        if reason:
            self.record(section, command, "skipped", 0, reason)
            return cwd
        if command.startswith("huggingface-cli download"):
            r, dt = self.stand_in_hf_model()
            self.record(section, command, self.status(r), dt, "no network: a stand-in model written there "
                        "(tiny, random, ChatML)" + self.tail(r))
            return cwd
        if any(command.startswith(s) for s in SERVERS):
            self.start_server(section, command, cwd)
            return cwd
        if self.quick and command.startswith("python problem.py"):
            command += " --steps 20 --test-size 200"
        if "device=cuda" in command or section == "Benchmarks":  # GPU commands (the H200 benchmark's config
            # replays CUDA graphs): on a machine without a GPU, train.py's one line that says so
            r, dt = self.shell(command, cwd, timeout=None if not self.quick else 1800)
            gpu = subprocess.run(["python", "-c", "import torch; print(torch.cuda.is_available())"], env=self.env,
                                 capture_output=True, text=True).stdout.strip() == "True"
            last = (r.stderr.strip().splitlines() or [""])[-1]
            ok = r.returncode == 0 if gpu else (r.returncode == 2 and last.startswith("error: ")
                                                and ("CUDA" in last or "GPU" in last) and "Traceback" not in r.stderr)
            self.record(section, command, "ok" if ok else "FAILED", dt,
                        self.tail(r) if gpu else "no GPU here: refused in one line: " + last[:150])
            return cwd
        stdin = self.repl_input(command)
        r, dt = self.shell(command, cwd, stdin=stdin, timeout=None if not self.quick else 1800)
        self.record(section, command, self.status(r), dt, self.tail(r))
        if command.startswith("cd ") and r.returncode == 0:
            cwd = os.path.normpath(os.path.join(cwd, shlex.split(command)[1]))
        return cwd

    @staticmethod
    def repl_input(command):
        """A prompt for the REPLs (infer.py without --prompt, infer_c's infer without -g or -i), then EOF."""
        words = shlex.split(command)
        if words[:2] == ["python", "infer.py"] and "--prompt" not in words:
            return "/help\nAnd God said\n"
        if words and os.path.basename(words[0]) == "infer" and not {"-g", "-i", "--ids"} & set(words):
            return "/help\nAnd God said\n"
        return None

    @staticmethod
    def status(r):
        return "ok" if r.returncode == 0 else "FAILED"

    @staticmethod
    def tail(r):
        if r.returncode == 0:
            return ""
        return f"exit {r.returncode}: " + (r.stderr.strip() or r.stdout.strip())[-600:].replace("\n", " | ")

    # --- servers and their clients ----------------------------------------------------------

    def start_server(self, section, command, cwd):
        port = next(p for s, p in SERVERS.items() if command.startswith(s))
        port = int(shlex.split(command)[shlex.split(command).index("--port") + 1]) if "--port" in command else port
        log = open(os.path.join(self.work, f"server_{port}.log"), "w")
        t0 = time.time()
        proc = subprocess.Popen(["bash", "-c", "exec " + command], cwd=cwd, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        up = wait_for_port(port, proc, timeout=300)
        self.servers.append(proc)
        self.record(section, command, "ok" if up else "FAILED", time.time() - t0,
                    f"listening on {port} (stopped after its clients)" if up else
                    f"not listening on {port}: " + open(log.name).read()[-400:])
        if up and command.startswith("python infer/serve.py"):
            r, dt = self.shell("curl -sfI http://localhost:8000/ | grep -i content-security-policy", cwd)
            self.record(section, "(open http://localhost:8000/: the page, with its CSP header)", self.status(r), dt)
        if up and command.startswith("tensorboard"):
            r, dt = self.shell("curl -sf http://localhost:6006/ >/dev/null", cwd)
            self.record(section, "(open http://localhost:6006/)", self.status(r), dt)
        if up and "--api-key" in command:
            key = shlex.split(command)[shlex.split(command).index("--api-key") + 1]
            r, dt = self.shell(f"curl -sf http://127.0.0.1:{port}/v1/models -H 'Authorization: Bearer {key}'", cwd)
            self.record(section, f"(GET /v1/models on {port} with the key)", self.status(r), dt, self.tail(r))

    def run_python_blocks(self, cwd):
        for code in python_blocks():
            r, dt = self.shell(f"python -c {shlex.quote(code)}", cwd, timeout=300)
            self.record("9. Serve an OpenAI-compatible API", "(the README's Python client) " + code.splitlines()[-1],
                        self.status(r), dt, r.stdout.strip()[:80] if r.returncode == 0 else self.tail(r))

    def stop_servers(self):
        for proc in self.servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.servers = []

    # --- all of it ---------------------------------------------------------------------------

    def run(self):
        self.clone()
        self.inputs_made = False
        section_before, cwd = None, self.repo
        for section, command in bash_lines(os.path.join(self.repo, "README.md")):
            if self.only and not (section.startswith(self.only) or command.startswith("pip install -r requirements")):
                continue
            if section != section_before:  # every section starts at the repository's root, no server up
                self.stop_servers()
                section_before, cwd = section, self.repo
            if not self.inputs_made and not command.startswith("pip install -r requirements"):
                self.inputs()
                self.inputs_made = True
            if command.startswith("curl http://127.0.0.1:8000/v1/chat"):
                self.run_python_blocks(cwd)  # the Python client beside it, against the same server
            cwd = self.run_command(section, command, cwd)
        self.stop_servers()
        return [r for r in self.results if r[2] == "FAILED"]


def wait_for_port(port, proc, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short training runs (CI)")
    p.add_argument("--work", default=os.path.join("/tmp", "nano-readme-run"), help="scratch folder (removed first)")
    p.add_argument("--python", default=sys.executable, help="the Python that makes the fresh virtual environment")
    p.add_argument("--only", metavar="SECTION", help='the set-up, then only the README section whose title starts '
                   'so (e.g. "10."), in the venv of an earlier run (--work)')
    args = p.parse_args()
    t0 = time.time()
    venv = os.path.join(args.work + "-venv")
    if not (args.only and os.path.exists(os.path.join(venv, "bin", "python"))):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([args.python, "-m", "venv", venv], check=True)
    runner = Runner(args.work, args.quick, os.path.join(venv, "bin", "python"), args.only)
    print(f"README commands on a fresh clone of {ROOT} ({subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}) "
          f"in a fresh venv ({venv}); {'--quick' if args.quick else 'full'}; {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    try:
        failed = runner.run()
    finally:
        runner.stop_servers()
    total = time.time() - t0
    ran = sum(1 for r in runner.results if r[2] != "skipped")
    print(f"\n{ran} commands run, {len(failed)} failed, "
          f"{sum(1 for r in runner.results if r[2] == 'skipped')} not run (reasons above); {total / 60:.1f} min in all; "
          f"load now {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for section, command, _, _, note in failed:
        print(f"FAILED {section}: {command}\n       {note}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
