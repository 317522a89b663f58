"""The Python packages the GPU check needs on a GPU machine that has its own CUDA torch but no
network: megatron-core, DeepSpeed and their small dependencies, as wheels for Python 3.12.

    python -m tools.gpu_wheels download [--dest .cache/gpu_wheels]     here, with network
    python -m tools.gpu_wheels install  [--wheels .cache/gpu_wheels] [--target .cache/gpu_site]

`download` fetches the wheels for CPython 3.12 on x86-64 Linux (megatron-core and DeepSpeed at
the project's pins, DeepSpeed built into a pure-Python wheel here), writes `manifest.json` with
their sizes and checksums, and refuses a set larger than MAX_BYTES (what may travel with the
working tree). `install` puts them into `--target` with `--no-deps` (torch, numpy, tqdm and the
rest are the machine's own), so that `PYTHONPATH=<target>` makes them importable beside the
machine's torch without changing its site-packages; it needs no network and no compiler.
Transformer Engine is not among them: its CUDA wheel alone is ~280 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEST = os.path.join(ROOT, ".cache", "gpu_wheels")
MAX_BYTES = 64 * 2**20
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
            "--abi", "none", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "any"]
DEPENDENCIES = ["einops", "hjson", "msgpack", "py-cpuinfo", "pydantic>=2", "psutil", "packaging>=24.2"]
"""What megatron-core and DeepSpeed import that a bare CUDA torch install may lack (DeepSpeed's
requirements less torch, numpy, tqdm and ninja, which the GPU machine has; megatron-core needs a
recent packaging)."""


def pinned(name: str, python: str = "3.12") -> str:
    """The requirement pyproject.toml gives `name` on Python `python` (markers on python_version)."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    for line in re.findall(r'^\s*"([^"]+)",', text, flags=re.M):
        requirement, _, marker = line.partition(";")
        if not requirement.strip().startswith(name + "=="):
            continue
        m = re.search(r"python_version\s*(<|>=)\s*'([\d.]+)'", marker)
        if m is None or _holds(python, m.group(1), m.group(2)):
            return requirement.strip()
    raise SystemExit(f"pyproject.toml pins no {name} for Python {python}")


def _holds(version: str, op: str, bound: str) -> bool:
    v, b = (tuple(int(x) for x in s.split(".")) for s in (version, bound))
    return v < b if op == "<" else v >= b


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def download(dest: str) -> int:
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(dest):
        os.remove(os.path.join(dest, name))
    # megatron-core ships CPython 3.12 wheels; its dependencies (torch, numpy, packaging) are
    # resolved below or are the machine's.
    _pip("download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", dest, pinned("megatron-core"))
    _pip("download", "--only-binary=:all:", *PLATFORM, "-d", dest, *DEPENDENCIES)
    # DeepSpeed is published as a source package whose build imports torch; built here with no
    # ops compiled (they are compiled on first use), it is a pure-Python wheel for any Python.
    with tempfile.TemporaryDirectory() as build:
        _pip("wheel", "--no-deps", "--no-build-isolation", "-w", build, pinned("deepspeed"))
        for name in os.listdir(build):
            os.replace(os.path.join(build, name), os.path.join(dest, name))
    files = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
    manifest = {f: {"bytes": os.path.getsize(os.path.join(dest, f)), "sha256": _sha256(os.path.join(dest, f))}
                for f in files}
    total = sum(m["bytes"] for m in manifest.values())
    with open(os.path.join(dest, "manifest.json"), "w") as f:
        json.dump({"total_bytes": total, "files": manifest}, f, indent=2)
    for name, m in manifest.items():
        print(f"{m['bytes'] / 2**20:7.2f} MiB  {name}")
    print(f"{total / 2**20:7.2f} MiB in {len(files)} wheels in {os.path.relpath(dest, ROOT)}")
    if total > MAX_BYTES:
        print(f"error: {total / 2**20:.1f} MiB exceeds the {MAX_BYTES / 2**20:.0f} MiB that may travel "
              "with the working tree", file=sys.stderr)
        return 1
    return 0


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def install(wheels: str, target: str) -> int:
    manifest_path = os.path.join(wheels, "manifest.json")
    if not os.path.isfile(manifest_path):
        print(f"error: {manifest_path} not found; run `make gpu-wheels` on a machine with network and "
              "carry .cache/gpu_wheels with the working tree", file=sys.stderr)
        return 1
    with open(manifest_path) as f:
        manifest = json.load(f)["files"]
    bad = [name for name, m in manifest.items()
           if not os.path.isfile(os.path.join(wheels, name)) or _sha256(os.path.join(wheels, name)) != m["sha256"]]
    if bad:
        print(f"error: missing or damaged wheels: {bad}; run `make gpu-wheels` again", file=sys.stderr)
        return 1
    paths = [os.path.join(wheels, name) for name in manifest]
    os.makedirs(target, exist_ok=True)
    try:
        _pip("install", "--no-deps", "--no-index", "--upgrade", "--target", target, *paths)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        # No pip on the machine: a wheel is a zip of what goes into site-packages.
        print(f"pip failed ({e}); unpacking the wheels into {target} instead", flush=True)
        for path in paths:
            with zipfile.ZipFile(path) as z:
                z.extractall(target)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch the wheels (needs the package registry)")
    d.add_argument("--dest", default=DEFAULT_DEST)
    i = sub.add_parser("install", help="install the carried wheels with --no-deps into a folder")
    i.add_argument("--wheels", default=DEFAULT_DEST)
    i.add_argument("--target", default=os.path.join(ROOT, ".cache", "gpu_site"))
    args = p.parse_args(argv)
    if args.command == "download":
        return download(args.dest)
    return install(args.wheels, args.target)


if __name__ == "__main__":
    raise SystemExit(main())
