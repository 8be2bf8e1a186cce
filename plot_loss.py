"""
Plot train and validation loss against step from a run's train.log.

    python plot_loss.py checkpoint/pretrain                  # writes checkpoint/pretrain/loss.png
    python plot_loss.py checkpoint/pretrain/train.log -o loss.png
    python plot_loss.py checkpoint/pretrain --live 10        # redraw every 10 s while training runs

train.log is the plain-text log train.py writes ("step N/MAX | loss L | ..." and
"eval step N | val loss L | ..."); a log that was appended to by a resumed run is
read as one curve (a repeated step keeps its latest value).
"""

import argparse
import os
import re
import sys
import time

STEP_RE = re.compile(r"^step (\d+)(?:/\d+)? \| loss ([0-9.naif]+)")  # (older logs: no "/max_iters")
EVAL_RE = re.compile(r"^eval step (\d+) \| val loss ([0-9.naif]+)")


def read_log(path):
    """Return ({step: train loss}, {step: val loss}) from a train.log."""
    train, val = {}, {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = STEP_RE.match(line)
            if m:
                train[int(m.group(1))] = float(m.group(2))
                continue
            m = EVAL_RE.match(line)
            if m:
                val[int(m.group(1))] = float(m.group(2))
    return train, val


def plot(log_path, out_path):
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train, val = read_log(log_path)
    if not train and not val:
        raise ValueError(f"{log_path} holds no loss lines yet")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], label="train loss", linewidth=1, alpha=0.8)
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", label="val loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(os.path.dirname(os.path.abspath(log_path)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return len(train), len(val)


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot loss curves from a Nano train.log")
    p.add_argument("run", help="a run directory (holding train.log) or a train.log file")
    p.add_argument("-o", "--out", help="PNG to write (default: loss.png beside the log)")
    p.add_argument("--live", type=float, metavar="SECONDS", help="redraw every SECONDS until Ctrl-C")
    args = p.parse_args(argv)
    log_path = os.path.join(args.run, "train.log") if os.path.isdir(args.run) else args.run
    if not os.path.exists(log_path):
        print(f"error: no log at {log_path}", file=sys.stderr)
        sys.exit(2)
    out = args.out or os.path.join(os.path.dirname(log_path) or ".", "loss.png")
    while True:
        try:
            n_train, n_val = plot(log_path, out)
            print(f"wrote {out} ({n_train} train points, {n_val} val points)")
        except ValueError as e:
            if not args.live:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
        if not args.live:
            return
        try:
            time.sleep(args.live)
        except KeyboardInterrupt:
            return


if __name__ == "__main__":
    main()
