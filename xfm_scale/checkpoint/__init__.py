"""Checkpoints: the writer (publish-when-complete saves through DeepSpeed) and the reader (any
ZeRO-2/3 x TP checkpoint as full tensors, without DeepSpeed at import)."""
