"""Generate the Python code of protos/ into gen/python, or check that it is current.

`python tools/protogen.py` writes the code; `--check` generates into a scratch directory and
exits 1 when the committed code differs, so stale stubs fail `make test`.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "gen" / "python"


def generate(out: Path) -> None:
    """Run protoc with the Python, typed-stub (mypy-protobuf) and gRPC plugins into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in {out / Path(f).parent for f in files}:
        while package != out:
            (package / "__init__.py").touch()
            package = package.parent
    (out / "credits" / "py.typed").touch()


def differences(left: Path, right: Path) -> list[str]:
    """Paths that differ between two generated trees."""
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [*cmp.left_only, *cmp.right_only, *cmp.diff_files, *cmp.funny_files]
    out = [str(left / name) for name in found]
    for sub in cmp.common_dirs:
        out += differences(left / sub, right / sub)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/python is stale")
    check = parser.parse_args().check
    if not check:
        shutil.rmtree(OUT, ignore_errors=True)
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        generate(fresh)
        stale = differences(OUT, fresh) if OUT.exists() else [str(OUT)]
    if stale:
        print("generated code is stale; run `make gen` and commit:", *stale, sep="\n  ")
        return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
