"""Mirrors the package as pip installs it (broker/ as zrpc/broker, examples/ as zrpc/examples,
from setup.cfg's package_dir) under a folder, as symlinks to the sources, so that mypy and the
import contract see the one import root the way users import it."""

from __future__ import annotations

import configparser
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, Path]:
    """Each installed package name -> its source folder."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    mapping = dict(line.split("=") for line in cfg["options"]["package_dir"].split("\n") if line.strip())
    mapping = {k.strip(): v.strip() for k, v in mapping.items()}
    out = {}
    for pkg in (p.strip() for p in cfg["options"]["packages"].split("\n") if p.strip()):
        # the longest mapped prefix decides where a package's sources are
        prefix = max((k for k in mapping if pkg == k or pkg.startswith(k + ".")), key=len, default="")
        rest = pkg[len(prefix):].lstrip(".").split(".") if prefix else pkg.split(".")
        base = ROOT / mapping[prefix] if prefix else ROOT
        out[pkg] = base.joinpath(*[r for r in rest if r])
    return out


def build(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    for pkg, src in package_dirs().items():
        target = dest.joinpath(*pkg.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix in (".py", ".typed"):
                (target / f.name).symlink_to(f)


def source_of(path: str, dest: Path) -> str:
    """The source path behind a path in the mirror (for readable error messages)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT)) if (dest in p.absolute().parents) else path
    except ValueError:
        return path


if __name__ == "__main__":
    build(Path(sys.argv[1]).resolve())
