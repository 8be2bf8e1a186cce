"""No module of the repository takes the name of an installed one.

The scripts run with the repository root first on sys.path, so a top-level module named like an
installed package (the old kernels.py and Hugging Face's `kernels`, which transformers imports)
replaces it for every library that imports it, and the library breaks far from the cause.
"""

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "*.py")))


def _run(code, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_no_module_has_an_installed_name(tmp_path):
    """find_spec in a fresh interpreter (nothing of ours imported) with the repository off sys.path:
    the standard library and site-packages both count."""
    code = textwrap.dedent(f"""
        import importlib.util, json, os, sys
        repo = {REPO!r}
        def ours(p):
            p = os.path.abspath(p or ".")
            return p == repo or p.startswith(repo + os.sep)
        sys.path[:] = [p for p in sys.path if p not in ("", ".") and not ours(p)]
        found = {{}}
        for name in {MODULES!r}:
            spec = importlib.util.find_spec(name)
            if spec is not None:
                found[name] = spec.origin
        print(json.dumps(found))
    """)
    r = _run(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert not found, ("top-level modules named like installed ones (rename ours): "
                       + ", ".join(f"{n}.py shadows {origin}" for n, origin in found.items()))


def test_transformers_works_beside_the_repository():
    """transformers imported with the repository root first on sys.path, as a script of ours has it:
    a tiny Llama is built and run, which forces its lazy imports, and none of them is one of ours."""
    pytest.importorskip("transformers")
    code = textwrap.dedent(f"""
        import json, os, sys
        repo = {REPO!r}
        sys.path.insert(0, repo)
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
        model = LlamaForCausalLM(cfg).eval()
        auto = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3]])).logits
        assert tuple(logits.shape) == (1, 3, 64), logits.shape
        ours = sorted(name for name in {MODULES!r} if name in sys.modules)
        print(json.dumps(ours))
    """)
    r = _run(code, cwd=REPO)
    assert r.returncode == 0, f"transformers fails beside the repository:\n{r.stderr[-3000:]}"
    ours = json.loads(r.stdout.strip().splitlines()[-1])
    assert not ours, f"importing transformers loaded the repository's {ours} in place of installed modules"
