"""Make the profiles and control vectors that ship in vectors/, with a provenance file each.

    python scripts/make_vectors.py                      # every bundled model, helpful axis
    python scripts/make_vectors.py smollm2-135m-instruct
    python scripts/make_vectors.py --axis harmless smollm2-135m-instruct
    python scripts/make_vectors.py --threads 1 smollm2-135m-instruct   # on a busy machine
    python scripts/make_vectors.py --limit 40 smollm2-135m-instruct     # fewer queries (recorded)
    python scripts/make_vectors.py --axis harmless --recipe request qwen2.5-coder-0.5b-instruct  # gated vector
    python scripts/make_vectors.py --axis harmless --recipe request --from-run runs/DIR MODEL  # ship a gated
        # vector that same command (with -o runs/DIR) made earlier, after measuring it (nothing is run again)

For each model this runs the project's own pipeline (`alignez steer`, default settings, seed 0)
into vectors/<model>/ and records the exact command, seed, data hash and time taken. The model is
named by its bundled name, file name and SHA-256 (checked against the published one), never by a
local path, so the record is the same on every machine.
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
from typing import Any

from alignez_local.version import __version__
from alignez_local.models import BUNDLED

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"]
AXES = ("helpful", "harmless")


def model_record(name: str, reported: dict[str, Any]) -> dict[str, Any]:
    """Return the model's identity for provenance: bundled name, file, SHA-256 and shape, no path."""
    rec = {"name": name, **{k: v for k, v in reported.items() if k not in ("name", "path")}}
    if "file" not in rec and "path" in reported:
        rec["file"] = Path(reported["path"]).name
    published = BUNDLED[name].sha256
    if published is not None and rec["sha256"] != published:
        raise SystemExit(f"{name}: the model used has SHA-256 {rec['sha256']}, not the published {published}")
    return rec


def make(model: str, axis: str = "helpful", threads: str | None = None, limit: str | None = None,
         recipe: str | None = None, from_run: str | None = None) -> None:
    out = ROOT / "vectors" / model
    out.mkdir(parents=True, exist_ok=True)  # a model's first shipped file
    work = out / f"run-{axis}" if from_run is None else Path(from_run).resolve()
    cmd = ["alignez", "steer", "-m", model, "--axis", axis, "--seed", "0", "-o", str(work.relative_to(ROOT))]
    if limit:
        cmd[6:6] = ["--limit", limit]  # fewer queries than steer's default: part of the recorded command
    if recipe:
        cmd[6:6] = ["--recipe", recipe]
    # Threads change the speed, not the result: they are left out of the recorded command.
    extra = ["--threads", threads] if threads else []
    t0 = time.monotonic()
    if from_run is None:
        subprocess.run([sys.executable, "-m", "alignez_local", *cmd[1:], *extra], cwd=ROOT, check=True)
    took = time.monotonic() - t0
    report = json.loads((work / "report.json").read_text())
    if from_run is not None:  # the run was made earlier by this command: its stages' own timings
        took = sum(report["timings"].get(k, 0.0) for k in ("capture_s", "answers_s", "fit_s", "calibrate_s"))
    if report.get("recipe") == "request":  # a gated vector: no pairs, no profile
        if from_run is None:
            shutil.move(work / "vector.gguf", out / f"{axis}.gguf")
        else:  # the run folder stays as measured
            shutil.copy2(work / "vector.gguf", out / f"{axis}.gguf")
        provenance = {
            "command": " ".join(cmd), "made_by": "scripts/make_vectors.py (runs the command, then renames run/* into this folder)",
            "seed": 0, "axis": report["axis"], "model": model_record(model, report["model"]), "recipe": "request",
            "queries": report["queries"], "request_contrast": report["request_contrast"],
            "default_strength": report["default_strength"], "calibration": report["calibration"],
            "timings_s": report["timings"], "wall_time_s": round(took, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "package_version": __version__,
        }
        if from_run is not None:
            provenance["made_by"] = ("scripts/make_vectors.py --from-run (the command was run into its own folder, "
                                     "measured there, then copied here; wall_time_s: the sum of its stages' timings)")
        (out / f"{axis}.provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if from_run is None:
            shutil.rmtree(work)
        print(f"{model}: {out} ({took:.0f}s)")
        return
    profile = json.loads(subprocess.run(
        [sys.executable, "-m", "alignez_local", "inspect", "--json", str(work / "profile.gguf")],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    shutil.move(work / "profile.gguf", out / f"{axis}.profile.gguf")
    shutil.move(work / "vector.gguf", out / f"{axis}.gguf")
    shutil.move(work / "preferences.jsonl", out / f"{axis}.preferences.jsonl")
    provenance = {
        "command": " ".join(cmd),
        "made_by": "scripts/make_vectors.py (runs the command, then renames run/* into this folder)",
        "seed": 0,
        "axis": report["axis"],
        "model": model_record(model, report["model"]),
        "data_sha256": profile["provenance"]["data_sha256"],
        "n_queries": report["n_queries"],
        "method": report["method"], "site": report["site"], "layers": report["layers"],
        "recipe": report.get("recipe"),
        "data_quality": report.get("data_quality"),
        "default_strength": report.get("default_strength"),
        "calibration": report.get("calibration"),
        "approximation": report["approximation"],
        "timings_s": report["timings"],
        "wall_time_s": round(took, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": profile["provenance"]["package_version"],
    }
    (out / f"{axis}.provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    shutil.rmtree(work)
    print(f"{model}: {out} ({took:.0f}s)")


if __name__ == "__main__":
    args = sys.argv[1:]
    opts = {"--axis": "helpful", "--threads": None, "--limit": None, "--recipe": None, "--from-run": None}
    while args[:1] and args[0] in opts:
        if len(args) < 2:
            raise SystemExit(f"{args[0]} needs a value")
        opts[args[0]], args = args[1], args[2:]
    if opts["--axis"] not in AXES:
        raise SystemExit(f"--axis takes one of {', '.join(AXES)}")
    for m in args or MODELS:
        make(m, opts["--axis"], opts["--threads"], opts["--limit"], opts["--recipe"], opts["--from-run"])
