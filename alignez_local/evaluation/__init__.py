"""Evaluation: prompt sets, refusal detection, the local judge, the eval run."""
