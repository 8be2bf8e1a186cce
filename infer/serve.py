"""
serve.py: the static server for Nano's browser page (standard library only).

    python infer/serve.py                 # then open http://localhost:8000/
    python infer/serve.py --port 8080     # another port
    python infer/serve.py --bind 0.0.0.0  # other machines may connect too (the page still sends nothing out)

It serves this folder only (index.html, app.js, worker.js, nano.wasm, style.css), on 127.0.0.1
unless told otherwise, with the headers `python -m http.server` does not send:

* Content-Security-Policy on every response. The page's <meta> tag covers the page, but a
  worker takes its policy from the headers of its own script, so without this header worker.js
  ran unrestricted. The policy is read from index.html's <meta> tag (one copy to maintain), plus
  `frame-ancestors 'none'`, which only a header can carry.
* X-Content-Type-Options: nosniff, with explicit types for .js, .wasm, .css and .html.
* Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp (and
  Cross-Origin-Resource-Policy: same-origin): the page is cross-origin isolated, which a
  threaded WebAssembly build (SharedArrayBuffer) would need.
* Cache-Control: no-cache, so a rebuilt nano.wasm is picked up on reload.

Directory listings, other methods than GET and HEAD, and paths outside the folder are refused.
"""

import argparse
import functools
import http.server
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".wasm": "application/wasm"}


def page_policy(folder=HERE):
    """The Content-Security-Policy of index.html's <meta> tag, whitespace folded, plus frame-ancestors."""
    with open(os.path.join(folder, "index.html"), encoding="utf-8") as f:
        html = f.read()
    m = re.search(r'<meta\s+http-equiv="Content-Security-Policy"\s+content="([^"]+)"', html)
    if not m:
        raise SystemExit("serve.py: index.html has no Content-Security-Policy <meta> tag")
    return " ".join(m.group(1).split()) + "; frame-ancestors 'none'"


class PageHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler for one folder, with the security headers on every response."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **TYPES}
    policy = None  # set by make_server

    def end_headers(self):
        self.send_header("Content-Security-Policy", self.policy)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def list_directory(self, path):
        self.send_error(404, "No directory listings")
        return None

    def log_message(self, fmt, *args):
        if not getattr(self.server, "quiet", False):
            super().log_message(fmt, *args)


def make_server(host="127.0.0.1", port=8000, folder=HERE, quiet=False):
    """A ThreadingHTTPServer for the page (port 0: any free port); call serve_forever() on it."""
    handler = type("Handler", (PageHandler,), {"policy": page_policy(folder)})
    httpd = http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=folder))
    httpd.quiet = quiet
    return httpd


def main(argv=None):
    p = argparse.ArgumentParser(description="Serve Nano's browser page with its security headers")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--quiet", action="store_true", help="no request log")
    args = p.parse_args(argv)
    try:
        httpd = make_server(args.bind, args.port, quiet=args.quiet)
    except OSError as e:
        print(f"error: cannot listen on {args.bind}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    host, port = httpd.server_address[:2]
    shown = "localhost" if host == "127.0.0.1" else host
    print(f"Nano's browser page: http://{shown}:{port}/ (serving {HERE}; Ctrl-C stops)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
