#!/usr/bin/env python3
"""Runs the README's quick-start grpcurl session exactly as printed and checks
each printed output, so that the documentation cannot drift from the gateway.

What is read from README.md (nothing is copied here):
- the section `## Quick start`, up to the next `## ` heading;
- each fenced block whose info string is `sh`, `shell`, `bash` or `console`
  and that contains a `grpcurl` command is a step; the fenced block that
  follows it (before the next step) is the output the README promises;
- commands are the step's lines that start with `grpcurl` (a leading `$ ` is
  dropped, `\\` continuations and here-documents are kept); other lines
  (`cargo run ...`, comments) are not run: the gateway is already running.

How a step runs: its commands go to `bash` as printed, except that the
README's address (`localhost:50051`, `127.0.0.1:50051` or `0.0.0.0:50051`) is
replaced with the address of the gateway under test. stdout and stderr are
compared together (grpcurl prints a failed call's code and details on stderr;
its exit status is not checked, the printed output is).

How outputs compare: JSON documents structurally (key order and spacing do
not matter), other lines word for word. The only tolerated differences are
those the README declares variable:
- a JSON key named in a `<!-- quickstart-variable: key1, key2 -->` comment
  anywhere in the section matches any value of the same JSON type;
- an expected string value written `<...>` (angle brackets around anything)
  matches any string, and `<...>` inside a text line matches any text.

Usage: readme_quickstart.py --target HOST:PORT [README.md]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

SHELL_INFOS = {"sh", "shell", "bash", "console"}
README_ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1|0\.0\.0\.0):50051\b")
VARIABLE_COMMENT = re.compile(r"<!--\s*quickstart-variable:\s*(.*?)\s*-->", re.S)
PLACEHOLDER = re.compile(r"^<[^<>]+>$")
TIMEOUT_SECONDS = 30


class Step:
    def __init__(self, line: int, script: str, expected: str | None):
        self.line = line
        self.script = script
        self.expected = expected


def quick_start_section(readme: str) -> tuple[str, int]:
    match = re.search(r"^## Quick start[^\n]*\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    if not match:
        sys.exit("readme_quickstart: README.md has no '## Quick start' section")
    return match.group(1), readme[: match.start(1)].count("\n") + 1


def fenced_blocks(section: str, first_line: int):
    """(line number, info string, text) of each fenced block."""
    lines = section.split("\n")
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(```+|~~~+)\s*([^\s`]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening.groups()
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        yield first_line + start, info.lower(), "\n".join(body)


def commands(block: str) -> str:
    """The grpcurl commands of a shell block, with continuations and heredocs."""
    out: list[str] = []
    lines = block.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        if not stripped.startswith("grpcurl"):
            i += 1
            continue
        command = [stripped]
        # backslash continuations
        while command[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            command.append(lines[i])
        # here-document: keep lines up to its delimiter
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", "\n".join(command))
        if heredoc:
            delimiter = heredoc.group(1)
            while i + 1 < len(lines):
                i += 1
                command.append(lines[i])
                if lines[i].strip() == delimiter:
                    break
        out.append("\n".join(command))
        i += 1
    return "\n".join(out)


def steps(section: str, first_line: int) -> list[Step]:
    found: list[Step] = []
    for line, info, text in fenced_blocks(section, first_line):
        script = commands(text) if info in SHELL_INFOS else ""
        if script:
            found.append(Step(line, script, None))
        elif found and found[-1].expected is None:
            found[-1].expected = text
    return found


# ---- comparison -----------------------------------------------------------

def tokens(text: str) -> list[tuple[str, object]]:
    """JSON documents and non-empty text lines, in order."""
    decoder = json.JSONDecoder()
    out: list[tuple[str, object]] = []
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
                out.append(("json", value))
                i = end
                continue
            except json.JSONDecodeError:
                pass
        end = text.find("\n", i)
        end = len(text) if end < 0 else end
        out.append(("text", " ".join(text[i:end].split())))
        i = end
    return out


def same_type(a: object, b: object) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return True
    return type(a) is type(b)


def json_diff(expected, actual, variable: set[str], path: str) -> str | None:
    if isinstance(expected, str) and PLACEHOLDER.match(expected):
        return None if isinstance(actual, str) else f"{path}: expected a string, got {actual!r}"
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{path}: expected an object, got {actual!r}"
        if set(expected) != set(actual):
            return (f"{path}: keys differ: README has {sorted(expected)}, "
                    f"gateway printed {sorted(actual)}")
        for key in expected:
            if key in variable:
                if not same_type(expected[key], actual[key]):
                    return f"{path}.{key}: expected a {type(expected[key]).__name__}, got {actual[key]!r}"
                continue
            diff = json_diff(expected[key], actual[key], variable, f"{path}.{key}")
            if diff:
                return diff
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(expected) != len(actual):
            return f"{path}: expected {expected!r}, got {actual!r}"
        for n, (e, a) in enumerate(zip(expected, actual)):
            diff = json_diff(e, a, variable, f"{path}[{n}]")
            if diff:
                return diff
        return None
    if expected != actual or not same_type(expected, actual):
        return f"{path}: README shows {expected!r}, gateway printed {actual!r}"
    return None


def line_matches(expected: str, actual: str) -> bool:
    pattern = "".join(
        ".+?" if re.fullmatch(r"<[^<>]+>", part) else re.escape(part)
        for part in re.split(r"(<[^<>]+>)", expected)
    )
    return re.fullmatch(pattern, actual) is not None


def output_diff(expected: str, actual: str, variable: set[str]) -> str | None:
    want, got = tokens(expected), tokens(actual)
    for n in range(max(len(want), len(got))):
        if n >= len(want):
            return f"the gateway printed more than the README shows: {got[n][1]!r}"
        if n >= len(got):
            return f"the README shows more than the gateway printed: {want[n][1]!r}"
        (want_kind, want_value), (got_kind, got_value) = want[n], got[n]
        if want_kind != got_kind:
            return f"README shows {want_value!r}, gateway printed {got_value!r}"
        if want_kind == "json":
            diff = json_diff(want_value, got_value, variable, "$")
            if diff:
                return diff
        elif not line_matches(str(want_value), str(got_value)):
            return f"README shows {want_value!r}, gateway printed {got_value!r}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the running gateway")
    parser.add_argument("readme", nargs="?", default="README.md")
    args = parser.parse_args()

    with open(args.readme, encoding="utf-8") as f:
        section, first_line = quick_start_section(f.read())
    variable = {
        key.strip()
        for comment in VARIABLE_COMMENT.findall(section)
        for key in comment.split(",")
        if key.strip()
    }
    found = steps(section, first_line)
    if not found:
        print("readme_quickstart: no grpcurl command in the Quick start section")
        return 1
    print(f"readme_quickstart: {len(found)} step(s) from {args.readme}; "
          f"variable keys: {', '.join(sorted(variable)) or 'none'}")

    # grpcurl from the same virtualenv as this interpreter (scripts/tools.sh).
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    failures = 0
    for step in found:
        script = README_ADDRESS.sub(args.target, step.script)
        first = step.script.split("\n")[0]
        label = f"{args.readme}:{step.line}: {first[:90]}{'...' if len(first) > 90 else ''}"
        if step.expected is None:
            print(f"  FAIL  {label}\n        no output block follows this command")
            failures += 1
            continue
        run = subprocess.run(
            ["bash", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT_SECONDS,
            env=env,
        )
        diff = output_diff(step.expected, run.stdout, variable)
        if diff:
            failures += 1
            print(f"  FAIL  {label}\n        {diff}\n        --- printed (exit {run.returncode}):")
            print("\n".join("        " + line for line in run.stdout.rstrip().split("\n")))
        else:
            print(f"  ok    {label}")
    if failures:
        print(f"readme_quickstart: {failures} of {len(found)} step(s) differ from the README")
        return 1
    print(f"readme_quickstart: all {len(found)} step(s) print what the README shows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
