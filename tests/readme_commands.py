"""The commands the README shows, read from README.md itself (its ```bash blocks), so that a test or
a script runs what a reader copies. Used by tests/test_readme.py and bench/readme_run.py."""
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bash_lines(path=os.path.join(ROOT, "README.md")):
    """Every command line of the README's bash blocks, in order: (section title, line). A line ending
    in a backslash is joined with the next; comments after the command are dropped."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out, section = [], None
    for block in re.finditer(r"^(#+ [^\n]*)$|^```bash\n(.*?)^```", text, re.S | re.M):
        if block.group(1):
            section = block.group(1).lstrip("# ").strip()
            continue
        for line in block.group(2).replace("\\\n", " ").splitlines():
            command = strip_comment(line).strip()
            if command:
                out.append((section, command))
    return out


def strip_comment(line):
    """The line without a trailing `  # comment` (a # inside quotes, or inside a word, stays)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_command(prefix):
    """The one README command line that starts with prefix, as argv."""
    found = [line for _, line in bash_lines() if line.startswith(prefix)]
    if len(found) != 1:
        raise AssertionError(f"README.md has {len(found)} command lines starting with {prefix!r}: {found}")
    return shlex.split(found[0])
