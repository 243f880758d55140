"""Anatomy of the exact edit of a shipped profile: per chosen layer, the activation size, the directions'
projections on evaluation prompts, the pairs' own separation and the size of the edit's delta (issue 10).

    python scripts/records/edit_anatomy.py   # the shipped SmolLM2 helpful profile
"""
import numpy as np
from alignez_local.settings import RuntimeSettings, open_engine
from alignez_local.formats.profile import load_profile
from alignez_local.align.preferences import load_pairs
from alignez_local.align.fit import capture_pairs
from alignez_local.prompt_sets import load_eval_prompts
from alignez_local.align.edit import edit_delta
prof = load_profile("vectors/smollm2-135m-instruct/helpful.profile.gguf")
print("layers", prof.layers, {L: prof.subspaces[L].shape[0] for L in prof.layers}, prof.default_strength, prof.site)
eng = open_engine("smollm2-135m-instruct", RuntimeSettings(threads=2))  # noqa: E305
ps = [p.text for p in load_eval_prompts(kinds={"helpful"})][:16]
prompts = [eng.prompt(p) for p in ps]
L = list(range(eng.n_layer))
acts = eng.capture(prompts, L, site="ffn_out")
pairs = load_pairs("vectors/smollm2-135m-instruct/helpful.preferences.jsonl")
pos, neg = capture_pairs(eng, pairs, "ffn_out", quiet=True)
for Ly in prof.layers:
    th = prof.subspaces[Ly]
    a = acts[:, Ly]
    p = a @ th.T
    d = (pos[:, Ly] - neg[:, Ly])
    print(f"L{Ly} |x|={np.linalg.norm(a,axis=1).mean():.1f} p mean={p.mean(0).round(2)} p sd={p.std(0).round(2)} |diffmean|={np.linalg.norm(d.mean(0)):.2f} mean|diff|={np.linalg.norm(d,axis=1).mean():.2f} proj pos-neg on th0 = {(d@th[0]).mean():.2f}+-{(d@th[0]).std():.2f}")
    deltas = [np.linalg.norm(edit_delta(a[i], th)) for i in range(len(a))]
    print("   |delta| mean", np.mean(deltas).round(2))
