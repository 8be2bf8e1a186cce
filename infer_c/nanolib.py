"""
nanolib.py: nano.h's tokenizer and text-stream functions from Python, through ctypes and
infer_c/libnano.so (`make -C infer_c lib`: the release build of nano.c as a shared library).

For the tests (tests/test_bpe_c.py calls the encoder on thousands of strings without starting a
process for each) and bench/bench_bpe_c.py (times one nano_encode call, nothing else).

    lib = NanoLib()                  # builds libnano.so if needed
    m = lib.load("model.bin")
    ids = lib.encode(m, "text".encode())
    lib.token_bytes(m, ids[0]); lib.stream([b"caf\\xc3", b"\\xa9"]); lib.free(m)
"""

import ctypes
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


class NanoUtf8Stream(ctypes.Structure):
    _fields_ = [("held", ctypes.c_uint8 * 3), ("n_held", ctypes.c_int)]


class NanoLib:
    def __init__(self, path=HERE / "libnano.so", build=True):
        if build:
            r = subprocess.run(["make", "-C", str(HERE), "lib"], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"make -C infer_c lib failed:\n{r.stdout}{r.stderr}")
            self.build_log = r.stdout + r.stderr
        lib = self.lib = ctypes.CDLL(str(path))
        buf = ctypes.POINTER(ctypes.c_char)  # a writable buffer (c_char_p would pass a copy)
        lib.nano_load_file.restype = ctypes.c_void_p
        lib.nano_load_file.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        lib.nano_free.argtypes = [ctypes.c_void_p]
        lib.nano_encode.restype = ctypes.c_size_t
        lib.nano_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_size_t]
        lib.nano_token_text.restype = buf
        lib.nano_token_text.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t)]
        lib.nano_utf8_stream.restype = ctypes.c_size_t
        lib.nano_utf8_stream.argtypes = [ctypes.POINTER(NanoUtf8Stream), ctypes.c_char_p, ctypes.c_size_t, buf]
        lib.nano_utf8_finish.restype = ctypes.c_size_t
        lib.nano_utf8_finish.argtypes = [ctypes.POINTER(NanoUtf8Stream), buf]
        lib.nano_is_stop.restype = ctypes.c_int
        lib.nano_is_stop.argtypes = [ctypes.c_void_p, ctypes.c_int]

    def load(self, path, verify=True):
        """A Nano* (as an int); raises ValueError with the engine's message when the file is refused."""
        err = ctypes.create_string_buffer(256)
        m = self.lib.nano_load_file(str(path).encode(), int(verify), err)
        if not m:
            raise ValueError(err.value.decode(errors="replace"))
        return m

    def free(self, m):
        self.lib.nano_free(m)

    def encode(self, m, data):
        """Token ids of the bytes `data` (a list)."""
        ids = self.id_buffer(self.lib.nano_encode(m, data, len(data), None, 0))
        return ids[:self.encode_into(m, data, ids)]

    @staticmethod
    def id_buffer(n):
        return (ctypes.c_int * max(n, 1))()

    def encode_into(self, m, data, ids):
        """nano_encode alone: writes the ids of `data` into `ids` (an id_buffer); returns how many."""
        n = self.lib.nano_encode(m, data, len(data), ids, len(ids))
        assert n <= len(ids), "the id buffer is too small"
        return n

    def is_stop(self, m, token):
        """Whether generation ends at this token (nano_is_stop)."""
        return bool(self.lib.nano_is_stop(m, token))

    def token_bytes(self, m, i):
        n = ctypes.c_size_t()
        p = self.lib.nano_token_text(m, i, ctypes.byref(n))
        return ctypes.string_at(p, n.value)

    def stream(self, chunks):
        """What nano_utf8_stream writes for each byte chunk in turn, then what nano_utf8_finish writes."""
        st, out = NanoUtf8Stream(), []
        for c in chunks:
            buf = ctypes.create_string_buffer(3 * (len(c) + 3))  # NANO_UTF8_OUT(len(c))
            n = self.lib.nano_utf8_stream(ctypes.byref(st), c, len(c), buf)
            out.append(buf.raw[:n])
        buf = ctypes.create_string_buffer(3)
        n = self.lib.nano_utf8_finish(ctypes.byref(st), buf)
        return out + [buf.raw[:n]]
