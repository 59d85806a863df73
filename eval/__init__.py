"""Evaluation: cost meters, the toy benchmark, and (later) the sweep CLI and lmms-eval plugin."""
