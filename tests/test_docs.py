"""The README and docs/*.md say only what is there: every relative link and image resolves (and
its #anchor names a heading), every configs/, examples/ and cluster/ path named exists, and every
`codistill train|tune|compare|born-again|bench … configs/X.yaml` line in a ```bash block parses
with the CLI's own parser and names a config that loads with that line's overrides. No Ray."""

from __future__ import annotations

import glob
import os
import re
import shlex
import unicodedata
from dataclasses import dataclass

import pytest

from tests.conftest import REPO

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
CONFIG_COMMANDS = {"train", "tune", "compare", "born-again", "bench"}

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
NAMED_PATH = re.compile(r"(?<![\w/.-])((?:configs/[\w.-]+\.yaml)|(?:examples/[\w.-]+\.py)|(?:cluster/[\w.-]*\w))")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class Line:
    doc: str        # path relative to the repository
    number: int     # 1-based line number in the file
    text: str
    fence: str | None  # the language of the fenced block the line is in (None: prose; "" unnamed block)


def read_lines(doc: str) -> list[Line]:
    lines, fence, marker = [], None, None
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        for number, text in enumerate(f.read().split("\n"), start=1):
            m = FENCE.match(text)
            if m and fence is None:
                fence, marker = m.group(2).lower(), m.group(1)
                continue
            if m and fence is not None and text.strip().startswith(marker[0] * len(marker)) and not m.group(2):
                fence, marker = None, None
                continue
            lines.append(Line(doc, number, text, fence))
    return lines


def where(line: Line) -> str:
    return f"{line.doc}:{line.number}"


# --- (a) links and images -----------------------------------------------------------------------

def links(doc: str):
    """(line, target) of every Markdown link or image outside code."""
    for line in read_lines(doc):
        if line.fence is not None:
            continue
        prose = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line.text)
        for m in LINK.finditer(prose):
            yield line, m.group(1)


def is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) is not None  # http:, https:, mailto:, …


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_exist(doc):
    missing = []
    for line, target in links(doc):
        if is_external(target):
            continue
        path = target.split("#", 1)[0]
        if not path:
            continue  # an anchor in this page: test_anchors_name_headings
        resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path))
        if not os.path.exists(resolved):
            missing.append(f"{where(line)}: link target {target!r} does not exist ({os.path.relpath(resolved, REPO)})")
    assert not missing, "\n".join(missing)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    kept = []
    for ch in text:
        if ch in " -_" or ch.isalnum() or unicodedata.category(ch).startswith("M"):
            kept.append("-" if ch == " " else ch)
    return "".join(kept)


def anchors(doc: str) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in read_lines(doc):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line.text)
        if line.fence is not None or not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


@pytest.mark.parametrize("doc", DOCS)
def test_anchors_name_headings(doc):
    wrong = []
    for line, target in links(doc):
        if is_external(target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        page = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not page.endswith(".md") or not os.path.exists(os.path.join(REPO, page)):
            continue  # not a page of these docs (a missing one fails test_relative_links_exist)
        if anchor not in anchors(page):
            wrong.append(f"{where(line)}: {target!r}: {page} has no heading whose anchor is #{anchor}")
    assert not wrong, "\n".join(wrong)


# --- (b) paths named in the text ----------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS)
def test_named_paths_exist(doc):
    missing = []
    for line in read_lines(doc):
        for m in NAMED_PATH.finditer(line.text):
            path = m.group(1).rstrip(".")
            if not os.path.exists(os.path.join(REPO, path)):
                missing.append(f"{where(line)}: {path} does not exist")
    assert not missing, "\n".join(missing)


# --- (c) commands that name a config --------------------------------------------------------------

def bash_commands(doc: str):
    """(first line, command text) of every logical line of the ```bash blocks (continuations joined)."""
    pending, start = "", None
    for line in read_lines(doc):
        if line.fence not in ("bash", "sh", "shell", "console"):
            if pending:
                yield start, pending
            pending, start = "", None
            continue
        text = line.text.rstrip()
        if start is None:
            start = line
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        yield start, pending + text
        pending, start = "", None
    if pending:
        yield start, pending


def config_commands():
    found = []
    for doc in DOCS:
        for line, command in bash_commands(doc):
            try:
                words = shlex.split(command, comments=True)
            except ValueError as err:
                found.append(pytest.param(line, None, err, id=where(line)))
                continue
            for i, word in enumerate(words[:-1]):
                if word == "codistill" and words[i + 1] in CONFIG_COMMANDS:
                    found.append(pytest.param(line, words[i + 1:], None, id=where(line)))
                    break
    return found


def overrides_of(args) -> list[str]:
    """The overrides the CLI builds from these arguments (as codistill/cli.py does)."""
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "imports", None):
        overrides.append(f"imports+={','.join(args.imports)}")
    if args.command == "tune":
        for flag, key in ((args.samples, "num_samples"), (args.max_concurrent, "max_concurrent"),
                          (args.scheduler, "scheduler"), (args.search, "search")):
            if flag is not None:
                overrides.append(f"tune.{key}={flag}")
    if args.command == "born-again" and args.generations is not None:
        overrides.append(f"born_again.generations={args.generations}")
    return overrides


@pytest.mark.parametrize("line,argv,error", config_commands())
def test_command_names_a_config_that_loads(line, argv, error):
    from codistill import load_config
    from codistill.cli import build_parser

    assert error is None, f"{where(line)}: cannot split the command line: {error}"
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        args = None
    if args is None:
        pytest.fail(f"{where(line)}: `codistill {' '.join(argv)}` is not a valid command line "
                    "(argparse's message is in the captured stderr)", pytrace=False)
    config = args.config if args.command != "bench" else getattr(args, "config", None)
    if not config or not config.startswith("configs/"):
        return  # a file of the reader's own (my.yaml, best.yaml) or bench's default config
    path = os.path.join(REPO, config)
    assert os.path.isfile(path), f"{where(line)}: {config} does not exist"
    overrides = overrides_of(args)
    try:
        load_config(path, overrides)
        problem = None
    except Exception as err:  # noqa: BLE001 — any failure to load is what this test reports
        problem = f"{type(err).__name__}: {err}"
    if problem:
        pytest.fail(f"{where(line)}: {config} with {overrides or 'no overrides'} does not load: {problem}",
                    pytrace=False)


def test_the_docs_are_found():
    assert "README.md" in DOCS and len(DOCS) > 1, DOCS
    assert config_commands(), "no `codistill … configs/X.yaml` command found in any ```bash block"
