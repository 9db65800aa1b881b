"""Generate the Python code of protos/, or check that it is current.

Two copies: gen/python (package `credits.v1`, for the server: messages, gRPC and Connect stubs)
and the client package's `credits_client._proto` (the messages and gRPC stubs with their imports
rewritten, so that the client installs without the server and beside it).
`python tools/protogen.py` writes both; `--check` generates into a scratch directory and exits 1
when the committed code differs, so stale stubs fail `make test`. The TypeScript client's code
(clients/typescript/src/gen) is made and checked the same way, by buf with the protoc-gen-es of
clients/typescript/node_modules (`npm ci` there).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "gen" / "python"
CLIENT_OUT = ROOT / "clients" / "python" / "src" / "credits_client" / "_proto"
CLIENT_PACKAGE = "credits_client._proto"
_PROTO_IMPORT = re.compile(r"^from credits\.v1 import ", re.MULTILINE)
TS_CLIENT = ROOT / "clients" / "typescript"
TS_OUT = TS_CLIENT / "src" / "gen"  # the `out` of clients/typescript/buf.gen.yaml


def generate(out: Path) -> None:
    """Run protoc with the Python, typed-stub (mypy-protobuf), gRPC and Connect plugins into
    `out`. The Connect stubs (`*_connect.py`, protoc-gen-connectrpc with `protobuf=google`) use
    the same `_pb2` messages as the gRPC ones; the server's Connect edge serves them."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--plugin=protoc-gen-connectrpc={bindir / 'protoc-gen-connectrpc'}",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        f"--connectrpc_out={out}",
        "--connectrpc_opt=protobuf=google",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in {out / Path(f).parent for f in files}:
        while package != out:
            (package / "__init__.py").touch()
            package = package.parent
    (out / "credits" / "py.typed").touch()


def generate_client(out: Path) -> None:
    """The server's generated modules, flattened into `out` with imports of the client package."""
    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        out.mkdir(parents=True, exist_ok=True)
        for source in sorted((Path(scratch) / "credits" / "v1").glob("*_pb2*.py*")):
            text = _PROTO_IMPORT.sub(f"from {CLIENT_PACKAGE} import ", source.read_text())
            (out / source.name).write_text(text)
    (out / "__init__.py").write_text('"""Code generated from protos/credits/v1 (make gen)."""\n')


def generate_all(server_out: Path, client_out: Path) -> None:
    generate(server_out)
    generate_client(client_out)


def generate_ts(base: Path) -> Path:
    """Run buf with clients/typescript/buf.gen.yaml, its output under `base`; the code's dir."""
    plugin = TS_CLIENT / "node_modules" / ".bin" / "protoc-gen-es"
    if not plugin.exists():
        raise SystemExit(f"{plugin} is missing: run `npm ci` in {TS_CLIENT}")
    buf = Path(sys.executable).parent / "buf"
    subprocess.run(  # noqa: S603 - our own buf, template and directory
        [str(buf), "generate", "--template", "buf.gen.yaml", "--output", str(base)],
        cwd=TS_CLIENT,
        check=True,
    )
    return base / TS_OUT.relative_to(TS_CLIENT)


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
        shutil.rmtree(CLIENT_OUT, ignore_errors=True)
        generate_all(OUT, CLIENT_OUT)
        generate_ts(TS_CLIENT)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        server, client = Path(scratch) / "server", Path(scratch) / "client"
        generate_all(server, client)
        ts = generate_ts(Path(scratch) / "typescript")
        stale = [
            *(differences(OUT, server) if OUT.exists() else [str(OUT)]),
            *(differences(CLIENT_OUT, client) if CLIENT_OUT.exists() else [str(CLIENT_OUT)]),
            *(differences(TS_OUT, ts) if TS_OUT.exists() else [str(TS_OUT)]),
        ]
    if stale:
        print("generated code is stale; run `make gen` and commit:", *stale, sep="\n  ")
        return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
