"""Kernels: the LoRA-mixture op and its backends (filled in by the kernels issue)."""
