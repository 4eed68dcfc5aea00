"""The commands that train or export adapters: classify, causal-lm, sweep and export."""
