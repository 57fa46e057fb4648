"""`codistill list`: one line per registered method, model and data set, as `timm.list_models`."""

from __future__ import annotations

import re
import sys


def _first_line(obj) -> str:
    import inspect

    doc = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ").strip()
    # The first sentence: a full stop before a capital, not the one of "et al." or "e.g.".
    first = re.split(r"(?<!\bal\.)(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=[A-Z`(])", doc, maxsplit=1)[0]
    return first if len(first) <= 100 else first[:99] + "…"


def registry_lines(kind: str) -> list[str]:
    """One line per registered entry of `kind` (methods, models, datasets), as `timm.list_models`:
    the name and what it is (a method: its file's first sentence; a model or data set: its
    builder's, with the input kind and what else the registry knows)."""
    from codistill.data import DATASETS
    from codistill.methods import METHODS
    from codistill.models import MODELS

    lines = []  # (name, what it is): the names padded to the longest after
    if kind == "methods":
        for name in METHODS.names():
            cls = METHODS[name]
            module = sys.modules.get(cls.__module__)
            text = _first_line(module) if module is not None and cls.__module__.startswith("codistill.") else ""
            lines.append((name, text or _first_line(cls)))
    elif kind == "models":
        for name in MODELS.names():
            entry = MODELS[name]
            traits = [entry.input_kind] + (["branches"] if entry.branch_point is not None else []) + (
                [f"taps: {', '.join(entry.taps)}"] if entry.taps else [])
            lines.append((name, f"{_first_line(entry.build)}  [{'; '.join(traits)}]"))
    else:
        for name in DATASETS.names():
            entry = DATASETS[name]
            size = f", {entry.train_examples} train" if entry.train_examples else ""
            classes = f"{entry.num_classes} classes" if entry.num_classes else "classes from the data"
            lines.append((name, f"{_first_line(entry.load)}  [{entry.input_kind}; {classes}{size}]"))
    # A column as wide as the longest name and two spaces: a user's long name (a method of their
    # own registered by `--import`) must not run into its description.
    width = max((len(name) for name, _ in lines), default=0) + 2
    return [f"{name:<{width}}{text}" for name, text in lines]
