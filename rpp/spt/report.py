"""``python -m rpp.spt.report RUNS...``: FGVC and VTAB-1k group means of ``rpp.spt`` runs, in the layout of SPT's table.

Each RUN is a run directory of ``python -m rpp.spt`` (its ``result.json``) or a folder searched recursively for them.
Runs are grouped by method (backbone + prompt mode, e.g. "MAE deep") and placed by dataset: the five FGVC datasets
and the 19 VTAB-1k tasks in their Natural / Specialized / Structured groups (dataset names are matched loosely:
``CUB200``, ``cub_200_2011`` and ``cub`` are the same dataset; a run's ``benchmark`` tells Oxford Flowers in FGVC from
Flowers102 in VTAB). Several runs of one dataset (seeds) are averaged. A group mean over fewer datasets than the group
has is marked ``(k/n)``: it is not comparable with the published number.

The table gives top-1 on the test split at the best epoch (what SPT reports) and, below it, at the last epoch, followed
by SPT's published means (ViT-B/16, SPT-deep) for comparison. ``--per-dataset`` adds every dataset's own column;
``--json FILE`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from rpp.distributed import cli_main
from rpp.errors import UserError

PROG = "rpp.spt.report"
FGVC = ("CUB-200-2011", "NABirds", "Oxford Flowers", "Stanford Dogs", "Stanford Cars")
VTAB = {
    "Natural": ("CIFAR-100", "Caltech101", "DTD", "Flowers102", "Pets", "SVHN", "Sun397"),
    "Specialized": ("Camelyon", "EuroSAT", "Resisc45", "Retinopathy"),
    "Structured": (
        "Clevr-Count", "Clevr-Dist", "DMLab", "KITTI-Dist", "dSpr-Loc", "dSpr-Ori", "sNORB-Azim", "sNORB-Elev",
    ),
}  # fmt: skip
COLUMNS = ("FGVC", "Natural", "Specialized", "Structured")
# SPT's published means (Wang et al., ICML 2024), ViT-B/16, SPT-deep, top-1 (%).
PUBLISHED = {
    "SPT paper: MAE deep": {"FGVC": 83.26, "Natural": 67.19, "Specialized": 83.15, "Structured": 59.23},
    "SPT paper: MoCo v3 deep": {"FGVC": 86.0, "Natural": 76.20, "Specialized": 84.95, "Structured": 58.36},
}
_ALIASES = {
    "fgvc": {
        "CUB-200-2011": ("cub", "cub200", "cub2002011", "cub200_2011", "birds"),
        "NABirds": ("nabirds", "nabirds555"),
        "Oxford Flowers": ("flowers", "flowers102", "oxfordflowers", "oxfordflowers102", "flower102"),
        "Stanford Dogs": ("dogs", "dog120", "dogs120", "stanforddogs"),
        "Stanford Cars": ("cars", "car196", "cars196", "stanfordcars"),
    },
    "vtab": {
        "CIFAR-100": ("cifar", "cifar100"),
        "Caltech101": ("caltech", "caltech101"),
        "DTD": ("dtd",),
        "Flowers102": ("flowers", "flowers102", "oxfordflowers", "oxfordflowers102", "oxfordflowers102"),
        "Pets": ("pets", "pet", "oxfordpet", "oxfordiiitpet", "oxfordpets"),
        "SVHN": ("svhn",),
        "Sun397": ("sun", "sun397"),
        "Camelyon": ("camelyon", "patchcamelyon", "pcam"),
        "EuroSAT": ("eurosat",),
        "Resisc45": ("resisc", "resisc45"),
        "Retinopathy": ("retinopathy", "diabeticretinopathy", "dr"),
        "Clevr-Count": ("clevrcount",),
        "Clevr-Dist": ("clevrdist", "clevrdistance"),
        "DMLab": ("dmlab",),
        "KITTI-Dist": ("kitti", "kittidist", "kittidistance"),
        "dSpr-Loc": ("dspritesloc", "dsprloc", "dspritesxposition"),
        "dSpr-Ori": ("dspritesori", "dsprori", "dspritesorientation"),
        "sNORB-Azim": ("smallnorbazi", "snorbazim", "smallnorbazimuth"),
        "sNORB-Elev": ("smallnorbele", "snorbelev", "smallnorbelevation"),
    },
}
_LOOKUP = {(bench, alias): name for bench, names in _ALIASES.items() for name, al in names.items() for alias in al}
METHOD_NAMES = {"mae": "MAE", "mocov3": "MoCo v3", "timm": "supervised (timm)", "random": "random weights"}


def canonical(name: str, benchmark: str) -> str | None:
    """The table's name of a dataset (None when it is not one of SPT's FGVC / VTAB-1k datasets)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = re.sub(r"^(vtab1k|vtab|fgvc)", "", key)
    return _LOOKUP.get((benchmark, key))


def find_results(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "result.json":
            found.append(p)
        elif (p / "result.json").is_file():
            found.append(p / "result.json")
        elif p.is_dir():
            found.extend(sorted(p.rglob("result.json")))
        else:
            raise UserError(f"{p}: no such run directory")
    if not found:
        raise UserError(f"no result.json under {', '.join(paths)} (rpp.spt writes it when a run ends)")
    return found


def read_result(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    try:
        row = {
            "dataset": str(result["dataset"]),
            "benchmark": str(result["benchmark"]),
            "method": f"{METHOD_NAMES.get(result['backbone'], result['backbone'])} {result['mode']}",
            "best": 100 * float(result["best"]["acc"]),
            "last": 100 * float(result["last"]["acc"]),
            "finished": bool(result.get("finished", True)),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not an rpp.spt result.json ({type(e).__name__}: {e})") from None
    return row


def summarise(rows: list[dict]) -> tuple[dict, list[str]]:
    """{method: {"best"|"last": {"datasets": {name: acc}, "groups": {column: (mean, k, n)}}}}, and the runs not in
    SPT's table."""
    table: dict = {}
    other = []
    for row in rows:
        name = canonical(row["dataset"], row["benchmark"])
        if name is None:
            other.append(f"{row['dataset']} ({row['benchmark']})")
            continue
        for metric in ("best", "last"):
            accs = table.setdefault(row["method"], {}).setdefault(metric, {"runs": {}})["runs"]
            accs.setdefault(name, []).append(row[metric])
    for methods in table.values():
        for entry in methods.values():
            entry["datasets"] = {k: sum(v) / len(v) for k, v in entry.pop("runs").items()}
            groups = {"FGVC": FGVC, **VTAB}
            entry["groups"] = {}
            for column, members in groups.items():
                present = [entry["datasets"][d] for d in members if d in entry["datasets"]]
                if present:
                    entry["groups"][column] = (sum(present) / len(present), len(present), len(members))
    return table, other


def format_table(table: dict, per_dataset: bool = False) -> str:
    width = max([len(m) for m in table] + [len(m) for m in PUBLISHED] + [12]) + 14
    lines = [" " * (width + 16) + f"{'VTAB-1k':^48}", f"{'':<{width}}" + "".join(f"{c:>16}" for c in COLUMNS)]

    def cell(group) -> str:
        if group is None:
            return f"{'-':>16}"
        mean, k, n = group
        return f"{f'{mean:.2f}' + ('' if k == n else f' ({k}/{n})'):>16}"

    for metric, label in (("best", "best epoch"), ("last", "last epoch")):
        for method, entry in sorted(table.items()):
            groups = entry[metric]["groups"]
            lines.append(f"{f'{method} ({label})':<{width}}" + "".join(cell(groups.get(c)) for c in COLUMNS))
    for name, values in PUBLISHED.items():
        lines.append(f"{name:<{width}}" + "".join(cell((values[c], 1, 1)) for c in COLUMNS))
    if per_dataset:
        for method, entry in sorted(table.items()):
            lines.append("")
            lines.append(f"{method}: per dataset, top-1 % (best epoch / last epoch)")
            for group, members in (("FGVC", FGVC), *VTAB.items()):
                for d in members:
                    if d in entry["best"]["datasets"]:
                        best, last = entry["best"]["datasets"][d], entry["last"]["datasets"][d]
                        lines.append(f"  {group:<12} {d:<16} {best:6.2f} / {last:6.2f}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UserError(f"{message} (see --help)")


def report(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="rpp.spt run directories, or folders holding them")
    parser.add_argument("--per-dataset", action="store_true", help="also list every dataset's accuracy")
    parser.add_argument("--json", metavar="FILE", help="write the table as JSON")
    args = parser.parse_args(argv)
    rows = [read_result(p) for p in find_results(args.runs)]
    unfinished = sum(not r["finished"] for r in rows)
    table, other = summarise(rows)
    print(f"rpp.spt runs: {len(rows)} ({unfinished} unfinished); top-1 % on the test split")
    print(format_table(table, args.per_dataset))
    if other:
        print(f"not in SPT's table (left out): {', '.join(sorted(other))}")
    if args.json:
        out = {
            m: {k: {"datasets": v["datasets"], "groups": v["groups"]} for k, v in e.items()} for m, e in table.items()
        }
        Path(args.json).write_text(json.dumps({"runs": out, "published": PUBLISHED}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROG, report, argv)


if __name__ == "__main__":
    sys.exit(main())
