"""
The C engine's Q8 kernels on the packed layout (AVX-512 VNNI: weights repacked at load into tiles of 16
rows, nano.c section 2) against the scalar reference, and Q8 prompts fed as a batch against the same
prompt fed token by token, on every kernel path this CPU has (NANO_SIMD caps the dispatch), on 1 and 2
threads, for shapes whose rows leave partial tiles and for every group size the layout takes (multiples
of 4) and one it does not (2: the scalar kernel).
"""

import os
import random
import subprocess

import numpy as np
import pytest

import export
from locked_make import make
from model import ModelConfig
from test_infer_c import (ENGINE_DIR, MULTILINGUAL, batch_and_stepwise_logits, engine, engine_ids,  # noqa: F401
                          make_checkpoint, reference_logits, workdir)
from tokenizer import TrieTokenizer

LEVELS = ("scalar", "avx2", "avx512")


def cpu_has_vnni():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512_vnni"))


@pytest.fixture(scope="module")
def kernel_test():
    for target in ("kernel_test", "kernel_test_asan"):
        r = make("-C", str(ENGINE_DIR), target)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "warning" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    return {"release": str(ENGINE_DIR / "kernel_test"), "asan": str(ENGINE_DIR / "kernel_test_asan")}


@pytest.mark.parametrize("level", LEVELS)
def test_q8_kernels_equal_the_scalar_reference(kernel_test, level):
    """Every Q8 matrix kernel through the loader (take_mat repacks) and matmul_multi (the threads'
    split into tiles): packed and scalar results to the bit, AVX2's within float rounding; 1 and 2
    threads, and the sanitized build (no OpenMP)."""
    runs = [(kernel_test["release"], "1"), (kernel_test["release"], "2"), (kernel_test["asan"], "1")]
    for binary, threads in runs:
        env = dict(os.environ, NANO_SIMD=level, OMP_NUM_THREADS=threads, ASAN_OPTIONS="detect_leaks=1")
        r = subprocess.run([binary], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0 and r.stdout.startswith("ok:"), (binary, threads, r.stdout[-2000:], r.stderr[-2000:])
        assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr
        packed = int(r.stdout.split(",")[2].split()[0])
        if level == "avx512" and cpu_has_vnni():
            assert "avx512-vnni kernels" in r.stdout and packed > 0, r.stdout
        else:
            assert packed == 0, r.stdout


# shapes whose matrices' rows are not multiples of 16 (k/v: 24, hidden: 120, vocabulary 301), with the
# group sizes they allow (export.choose_group_size: a divisor of every row length)
SHAPES = {
    "w48": (dict(n_embd=48, n_head=4, n_kv_head=2, n_hidden=120, vocab=301), (2, 4, 8, 12, 24)),
    "w64": (dict(n_embd=64, n_head=4, n_kv_head=1, n_hidden=160, vocab=301), (16, 32)),
    "w128": (dict(n_embd=128, n_head=2, n_kv_head=2, n_hidden=192, vocab=301, n_layer=1), (64,)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_q8_prompt_batch_equals_token_by_token_exactly(engine, workdir, shape):  # noqa: F811
    """A Q8 prompt's logits at every position, batched (blocks of 5 and of 64 rows) and token by
    token: equal to the bit on each kernel path and thread count (the same int32 sums, scaled and
    added in the same order for a block as for one token), within the Q8 tolerance of PyTorch's, and
    the same greedy continuation."""
    cfg, group_sizes = SHAPES[shape]
    ck = make_checkpoint(seed=7, **cfg)
    tok = TrieTokenizer(ck["tokenizer"]["tokens"])
    block = ck["model_config"]["block_size"]
    ids = ([2] + tok.encode(MULTILINGUAL))[:block]
    ref = reference_logits(ck, ids)
    rng = random.Random(shape)
    for gs in group_sizes:
        assert export.choose_group_size(gs, ModelConfig.from_dict(ck["model_config"])) == gs
        path = workdir / f"packed_{shape}_{gs}.q8.bin"
        export.write_model(str(path), ck, "q8", gs)
        for level in LEVELS:
            for threads in ("1", "2"):
                env = {"NANO_SIMD": level}
                for rows in ("5", "64"):
                    step, batch = batch_and_stepwise_logits(engine["release"], path, ids, workdir, "-j", threads,
                                                            env=dict(env, NANO_PREFILL_ROWS=rows))
                    assert np.array_equal(step, batch), (shape, gs, level, threads, rows, np.abs(step - batch).max())
                assert np.abs(batch - ref).max() <= 0.02 * (ref.max() - ref.min()), (shape, gs, level)
                prompt = ",".join(str(rng.randrange(cfg["vocab"])) for _ in range(block // 2))
                flags = ("--ids", prompt, "-n", 12, "-t", 0, "--ignore-eos", "-j", threads)
                one = engine_ids(engine["release"], path, *flags, env=dict(env, NANO_PREFILL_ROWS="1"))
                assert engine_ids(engine["release"], path, *flags, env=dict(env, NANO_PREFILL_ROWS="7")) == one
        # the sanitized build (the packed kernels, the loader's in-place repacking, no OpenMP)
        step, batch = batch_and_stepwise_logits(engine["asan"], path, ids, workdir, env={"NANO_PREFILL_ROWS": "7"})
        assert np.array_equal(step, batch), (shape, gs, "asan")


def test_q8_repacked_wherever_the_file_is_read(engine, workdir):  # noqa: F811
    """The loader repacks a mapped file after moving it to anonymous memory, and a file read whole
    (NANO_HUGEPAGES=1) in place: the same logits, both layouts, release and sanitized builds."""
    ck = make_checkpoint(seed=3, **SHAPES["w48"][0])
    ids = [2] + TrieTokenizer(ck["tokenizer"]["tokens"]).encode(MULTILINGUAL)[:30]
    for fmt in ("2026.11", "2024.10"):
        path = workdir / f"huge_{fmt}.q8.bin"
        export.write_model(str(path), ck, "q8", 8, fmt)
        for binary in (engine["release"], engine["asan"]):
            mapped, whole = (batch_and_stepwise_logits(binary, path, ids, workdir, env={"NANO_HUGEPAGES": hp})
                             for hp in ("0", "1"))
            assert np.array_equal(mapped[0], whole[0]) and np.array_equal(mapped[1], whole[1]), (fmt, binary)
            assert np.array_equal(mapped[0], mapped[1]), (fmt, binary)
