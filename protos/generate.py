"""Regenerate (or check) the Python code generated from protos/psgpo/v1/*.proto.

python protos/generate.py          # rewrite *_pb2.py, *_pb2.pyi, *_pb2_grpc.py beside the protos
python protos/generate.py --check  # exit 1 if the committed code differs from a fresh generation
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "psgpo" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc  # imported lazily: only needed to regenerate

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out_root / "psgpo" / "v1").iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if args.check:
            stale = [
                p.name
                for p in fresh
                if not (PROTO_DIR / p.name).exists() or (PROTO_DIR / p.name).read_bytes() != p.read_bytes()
            ]
            committed = {p.name for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
            extra = sorted(committed - {p.name for p in fresh})
            if stale or extra:
                print(f"generated protobuf code is out of date: {stale + extra}; run `make protos`")
                return 1
            print("generated protobuf code is up to date")
            return 0
        for p in fresh:
            shutil.copyfile(p, PROTO_DIR / p.name)
            print(f"wrote {(PROTO_DIR / p.name).relative_to(ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
