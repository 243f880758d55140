"""Copy the trait suite's vectors into vectors/<model>/<trait>.gguf, each with a provenance file.

    .venv/bin/python scripts/ship_suite.py qwen2.5-coder-0.5b-instruct [--out runs/suite] [--traits french,brief]

Reads OUT/<model>/<trait>/default/ (made by scripts/trait_suite.py, i.e. pipeline.run_steer): the
vector as calibrated (its file holds the behaviour calibration), and report.json, from which the
provenance keeps the command, the model (bundled name, file, SHA-256; no path), the data hash, the
behaviour table (unsteered, prompting, random direction, vector, on the report half) and timings.
Only vectors whose calibration beat the random direction are shipped unless --all is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

from alignez_local.version import __version__
from alignez_local.formats.control_vector import read_control_vector

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--out", default="runs/suite")
    ap.add_argument("--traits", default=None)
    ap.add_argument("--all", action="store_true", help="Ship vectors that did not beat the random direction too.")
    ap.add_argument("--run", default=None, help="Ship one steer run folder (e.g. the README's main job) as --traits' one trait.")
    ap.add_argument("--command", default=None, help="The command that made --run (recorded).")
    args = ap.parse_args()
    base = Path(args.out) / args.model
    dest = ROOT / "vectors" / args.model
    dest.mkdir(parents=True, exist_ok=True)
    traits = args.traits.split(",") if args.traits else sorted(p.name for p in base.iterdir() if (p / "default" / "vector.gguf").exists())
    for trait in traits:
        run = Path(args.run) if args.run else base / trait / "default"
        cv = read_control_vector(run / "vector.gguf")
        cal = dict(cv.calibration or {})
        if not cal.get("beats_random") and not args.all:
            print(f"{trait}: not shipped ({cal.get('verdict')})")
            continue
        rep = json.loads((run / "report.json").read_text())
        shutil.copy(run / "vector.gguf", dest / f"{trait}.gguf")
        if (run / "preferences.jsonl").exists():
            shutil.copy(run / "preferences.jsonl", dest / f"{trait}.preferences.jsonl")
        prov = {
            "command": args.command or f"scripts/trait_suite.py {args.model} --traits {trait} --variants default --no-profile "
                       f"(pipeline.run_steer: --recipe {rep['recipe']}, --limit {rep['n_queries']}, "
                       f"--response-tokens {_response_tokens(run)}, seed 0)",
            "made_by": "scripts/ship_suite.py (copies the suite's vector.gguf and this record from its report.json)",
            "axis": rep["axis"], "model": rep["model"], "recipe": rep["recipe"], "n_queries": rep["n_queries"],
            "data_sha256": rep["data_sha256"], "site": rep["site"], "vector_layers": cv.layers,
            "default_strength": cv.default_strength, "beats_random": cal.get("beats_random"), "verdict": cal.get("verdict"),
            "behaviour": rep["behaviour"], "timings": rep["timings"],
            "calibration_trials": cal.get("trials"),
            **({"placements": cal["placements"]} if cal.get("placements") else {}),
            "machine": f"{platform.machine()}, {platform.system()}", "package_version": __version__,
        }
        (dest / f"{trait}.provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
        print(f"{trait}: shipped {dest / (trait + '.gguf')} (strength {cv.default_strength:g}, {cal.get('verdict')})")


def _response_tokens(run: Path) -> int | str:
    """Return the answer length the run's pairs were written with (every record stores its sampling)."""
    pairs = run / "preferences.jsonl"
    if not pairs.exists():
        return "?"
    with pairs.open() as f:
        return int(json.loads(f.readline())["sampling"]["response_tokens"])


if __name__ == "__main__":
    main()
