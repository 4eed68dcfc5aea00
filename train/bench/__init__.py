"""The benchmarks (``python -m train bench`` and ``bench-multi``) and their PyTorch PEFT peers."""
