"""Make the profiles and control vectors that ship in vectors/, with a provenance file each.

    python scripts/make_vectors.py                      # every bundled model
    python scripts/make_vectors.py smollm2-135m-instruct

For each model this runs the project's own pipeline (`alignez steer`, default settings, seed 0)
into vectors/<model>/ and records the exact command, seed, data hash and time taken.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["smollm2-135m-instruct", "gemma3-270m"]
AXIS = "helpful"


def make(model: str) -> None:
    out = ROOT / "vectors" / model
    work = out / "run"
    cmd = ["alignez", "steer", "-m", model, "--axis", AXIS, "--seed", "0", "-o", str(work.relative_to(ROOT))]
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "alignez_local", *cmd[1:]], cwd=ROOT, check=True)
    took = time.monotonic() - t0
    report = json.loads((work / "report.json").read_text())
    profile = json.loads(subprocess.run(
        [sys.executable, "-m", "alignez_local", "inspect", "--json", str(work / "profile.gguf")],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    shutil.move(work / "profile.gguf", out / f"{AXIS}.profile.gguf")
    shutil.move(work / "vector.gguf", out / f"{AXIS}.gguf")
    shutil.move(work / "preferences.jsonl", out / f"{AXIS}.preferences.jsonl")
    provenance = {
        "command": " ".join(cmd),
        "made_by": "scripts/make_vectors.py (runs the command, then renames run/* into this folder)",
        "seed": 0,
        "axis": report["axis"],
        "model": report["model"],
        "data_sha256": profile["provenance"]["data_sha256"],
        "n_queries": report["n_queries"],
        "method": report["method"], "site": report["site"], "layers": report["layers"],
        "approximation": report["approximation"],
        "timings_s": report["timings"],
        "wall_time_s": round(took, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": profile["provenance"]["package_version"],
    }
    (out / f"{AXIS}.provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    shutil.rmtree(work)
    print(f"{model}: {out} ({took:.0f}s)")


if __name__ == "__main__":
    for m in sys.argv[1:] or MODELS:
        make(m)
