"""Published training recipes shipped as YAML files: ``--recipe NAME`` loads ``rpp/recipes/NAME.yaml``.

A recipe file is a mapping with three keys::

    tool: rpp.train            # the command it configures (python -m <tool>)
    description: one line      # shown by --help and --print-config
    options:                   # option: value, exactly as in a --config file
      lr: 0.002                # every value carries a comment naming its source

Precedence when parsing a command line: dataclass defaults < ``--recipe`` < ``--config FILE`` < command-line options,
so a recipe is a starting point that a config file or single options refine. ``--print-config`` prints the resolved
options (as a YAML mapping that ``--config`` accepts) and exits.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from rpp.errors import UserError

__all__ = ["list_recipes", "load_recipe"]


def _files() -> dict[str, Any]:
    root = resources.files(__name__)
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def list_recipes(tool: str | None = None) -> list[str]:
    """Names of the shipped recipes (for ``tool`` only, when given), sorted."""
    names = sorted(_files())
    if tool is None:
        return names
    return [n for n in names if _read(n, _files()[n])["tool"] == tool]


def _read(name: str, path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:  # a shipped file: only a broken install gets here
        raise UserError(f"--recipe {name}: cannot parse {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("options"), dict) or not isinstance(data.get("tool"), str):
        raise UserError(f"--recipe {name}: {path} needs a 'tool' name and an 'options' mapping")
    return data


def load_recipe(name: str, tool: str) -> dict[str, Any]:
    """The options of recipe ``name`` for command ``tool`` (e.g. ``"rpp.train"``); keys use ``_`` spelling.

    Raises :class:`UserError` for an unknown name (listing the ones that exist) or a recipe of another tool.
    """
    files = _files()
    if name not in files:
        mine = ", ".join(list_recipes(tool)) or "none"
        raise UserError(f"--recipe: unknown recipe {name!r}; recipes for {tool}: {mine}")
    data = _read(name, files[name])
    if data["tool"] != tool:
        raise UserError(f"--recipe {name} configures python -m {data['tool']}, not {tool}")
    return {str(k).replace("-", "_"): v for k, v in data["options"].items()}
