"""
Nano's files: JSON configs and torch checkpoints, read with errors that name the file and the key.

Every script reads its configs and checkpoints through here, so that a misspelt key, a wrong type,
a truncated file or a pickle holding code stops with one line that says what is wrong and where.

  * Configs are dataclasses (model.ModelConfig, train.TrainConfig, model.LoRAConfig) filled from
    plain JSON by dataclass_from_dict, which refuses unknown keys and wrong types.
  * Checkpoints are plain dicts of tensors and JSON-able values, loaded with
    torch.load(weights_only=True) and written atomically (temp file, then rename).
  * An adapter records the identity of its base model (weights_fingerprint) and is refused on
    any other base (check_adapter).
  * NanoError is the base of every error class in Nano.

This is the bottom layer: it imports no other module of Nano (files <- tokenizer <- model <- hf <-
the scripts; tests/test_layering.py). A Hugging Face model directory, read where a checkpoint is
accepted, is hf.load_checkpoint's: this file reads Nano's own checkpoint files.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import zipfile

import torch

# the first 8 bytes of every Nano .bin (docs/FORMAT.md; export.py writes it): here, in the bottom layer,
# because the loaders (infer.py, llama2c.py: "a Nano .bin or llama2.c's?") must tell it apart without
# importing export.py, which brings gguf_export.py and the gguf package
NANO_BIN_MAGIC = b"S4DBMLRU"


class NanoError(ValueError):
    """Every error Nano explains in one line (the command-line tools print `error: <message>` and exit 2):
    bad input, a broken file, an output that cannot be written. Anything else is a bug."""


class ConfigError(NanoError):
    """A config or checkpoint is malformed; the message names the file, the key and the problem."""


class DataError(NanoError):
    """Bad input or a broken dataset; the message names the file and the problem."""


class OutputError(NanoError):
    """An output file or folder cannot be written; the message names the path and the cause."""


# ---------------------------------------------------------------------------
# JSON configs


def dataclass_from_dict(cls, d, where="config"):
    """Build dataclass `cls` from a plain dict, refusing unknown keys and wrong types.

    Shared by every JSON config in Nano (model, training, SFT, LoRA) so that a
    misspelt key or a string where a number belongs stops with a message naming it.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_"):  # "_comment" and friends are allowed and ignored
            continue
        if key not in fields:
            close = [k for k in fields if k.lower() == key.lower() or _edit_distance(k, key) <= 2]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        kwargs[key] = _check_type(value, fields[key].type, f"{where}: key {key!r}")
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def check_finite(obj, where):
    """Refuse NaN and infinity in a config dataclass's float fields (JSON reads NaN and Infinity,
    and every comparison with NaN is false, so range checks alone would let it through)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {f.name} must be a finite number, got {value}")


def _edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _check_type(value, annotation, where):
    """Check a JSON value against a (string) dataclass annotation; ints may stand for floats."""
    if not isinstance(annotation, str):  # a class (int) or a typing form (Optional[str])
        annotation = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    ann = annotation
    ann = ann.replace("typing.", "")
    optional = ann.startswith("Optional[") or ann.endswith("| None")
    base = ann.removeprefix("Optional[").removesuffix("]").removesuffix(" | None").strip()
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be null")
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base == "str":
        ok = isinstance(value, str)
    elif base.startswith("list"):
        ok = isinstance(value, list)
    elif base.startswith("dict"):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{where} must be {base}, got {json.dumps(value)}")
    return value


def read_json(path, what="config file", error=ConfigError):
    """Parse a JSON file; a missing or malformed file raises `error` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise error(f"{path}: not valid JSON: {e}") from None
    except RecursionError:  # (Python's parser recurses once per bracket: 100,000 of them end it)
        raise error(f"{path}: not valid JSON: it nests too deeply to read") from None


def read_folder_json(folder, name, required=True):
    """A JSON object file of a model directory (a Hugging Face one: config.json, tokenizer_config.json,
    ...); a missing optional file is {}. A missing required file, bad JSON or another JSON value than
    an object raise ConfigError naming the file."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        if required:
            raise ConfigError(f"{folder}: no {name} (a Hugging Face model directory holds config.json, "
                              "model.safetensors and tokenizer.json)")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not readable JSON (nested too deeply to read)") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def load_json(path, cls, where=None):
    """Read a JSON file into dataclass `cls`, with errors that name the file and key."""
    return dataclass_from_dict(cls, read_json(path), where or str(path))


def write_json(obj, path, indent=None):
    """Write JSON atomically (temp file, then rename): a reader never sees half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------
# Checkpoints: plain dicts, loaded weights-only, written atomically


def load_torch_file(path, what="checkpoint"):
    """torch.load(weights_only=True) with errors that name the file: missing, truncated, not a
    torch file, or holding objects other than tensors and plain data."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a file") from None
    except pickle.UnpicklingError:  # what weights_only refuses: classes, functions, other objects
        if not zipfile.is_zipfile(path):  # or no torch file at all (bytes torch's legacy reader rejects)
            raise ConfigError(f"{what} {path} is truncated or not a torch checkpoint "
                              f"({os.path.getsize(path):,} bytes)") from None
        raise ConfigError(f"{what} {path} holds Python objects other than tensors and plain data, which Nano "
                          "does not load: unpickling them could run any code the file carries. Re-save it as "
                          "a dict of tensors, numbers, strings, lists and dicts") from None
    except Exception as e:
        if _truncated(path, e):
            raise ConfigError(f"{what} {path} is truncated or not a torch checkpoint "
                              f"({os.path.getsize(path):,} bytes)") from None
        raise ConfigError(f"cannot load {what} {path}: {type(e).__name__}: {e}") from None


def _truncated(path, error):
    """Whether a failed torch.load read a file that is not a whole zip archive (torch.save's format):
    cut short by a crash or a full disk, or something else entirely."""
    if isinstance(error, (EOFError, zipfile.BadZipFile)) or "zip archive" in str(error):
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is not None
    except (OSError, zipfile.BadZipFile, ValueError):
        return os.path.isfile(path)


def save_checkpoint(obj, path):
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a reader (or a
    crash) sees the old file or the new one, never half of one. A write that fails (a full disk,
    no permission) removes the temporary file and raises OutputError naming the path and the
    cause; the old file stays as it was."""
    tmp = f"{path}.tmp"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, Exception):
            raise OutputError(f"cannot write {path}: {write_failure(e, path)}") from None
        raise  # Ctrl-C during a write: the temporary file is gone, the old checkpoint whole


def import_checkpoint(load, out, detail):
    """The body of the import commands (hf.py import, llama2c.py import): load() a foreign model as a
    checkpoint, write it to `out`, and say what was written in one line ending with detail(checkpoint);
    a NanoError is one line, `error: ...`, and exit status 2."""
    try:
        ck = load()
        save_checkpoint(ck, out)
    except NanoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cfg = ck["model_config"]
    print(f"wrote {out}: {cfg['n_layer']} layers, {cfg['n_embd']} wide, vocab {cfg['vocab_size']}, "
          f"context {cfg['block_size']}, {detail(ck)}")


def write_failure(error, path):
    """Why a write to `path` failed, in words: the OSError inside the chain of exceptions (torch.save
    wraps it in a RuntimeError), or a full disk seen afterwards."""
    e = error
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return "no space left on device" if e.errno == errno.ENOSPC else os.strerror(e.errno).lower()
        e = e.__cause__ or e.__context__
    with contextlib.suppress(OSError):
        if shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 1 << 20:
            return "no space left on device"
    return f"{type(error).__name__}: {error}"


def make_folder(path, what="out_dir"):
    """os.makedirs, with an OutputError that names the folder and the cause."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {what} {path}: {write_failure(e, path)}") from None


def load_nano_checkpoint(path):
    """Load a Nano checkpoint file (on the CPU) with weights_only=True; errors name the file and what is
    wrong. Where a Hugging Face model directory is accepted too, call hf.load_checkpoint."""
    if os.path.isdir(path):
        raise ConfigError(f"checkpoint {path} is a folder, not a file (a Hugging Face model directory is "
                          "read by hf.load_checkpoint)")
    ck = load_torch_file(path)
    if not isinstance(ck, dict) or "model" not in ck or "model_config" not in ck:
        raise ConfigError(f"{path} is not a Nano checkpoint (no 'model'/'model_config')")
    return ck



def load_training_state(path):
    """A checkpoint to resume from: a full Nano checkpoint or a LoRA run's adapter checkpoint."""
    ck = load_torch_file(path)
    if not isinstance(ck, dict) or "optimizer" not in ck or "step" not in ck:
        raise ConfigError(f"{path} holds no training state to resume from")
    return ck


# ---------------------------------------------------------------------------
# The identity of a base model, which LoRA adapters record


def weights_fingerprint(model_config, state_dict):
    """Identity of a base model: sha256 over its config (JSON, sorted keys) and every base tensor's
    name, shape and float32 bytes (names sorted; LoRA tensors excluded). Adapters record it so that
    attaching one to a different base fails loudly instead of producing garbage."""
    h = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode())
    for name in sorted(k for k in state_dict if ".lora_" not in k):
        t = state_dict[name].detach().cpu().float().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_adapter(adapter, base_ck, where="adapter"):
    """Refuse an adapter whose base is not this checkpoint's model (config and weights)."""
    if not isinstance(adapter, dict) or adapter.get("format") != "nano-lora" or "adapter" not in adapter:
        raise ConfigError(f"{where} is not a Nano LoRA adapter checkpoint")
    base = adapter.get("base", {})
    if base.get("model_config") != base_ck["model_config"]:
        raise ConfigError(f"{where} was made for a different model shape than this base "
                          f"({base.get('model_config')} vs {base_ck['model_config']})")
    fp = weights_fingerprint(base_ck["model_config"], base_ck["model"])
    if base.get("fingerprint") != fp:
        raise ConfigError(f"{where} was trained on a different base model (weight fingerprint "
                          f"{str(base.get('fingerprint'))[:12]}... vs this base {fp[:12]}...)")


def load_adapter(path, base_ck):
    """Load an adapter checkpoint (weights_only) and check that it belongs to base_ck."""
    adapter = load_torch_file(path, "adapter")
    check_adapter(adapter, base_ck, path)
    return adapter
