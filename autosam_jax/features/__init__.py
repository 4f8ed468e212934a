"""Frozen-encoder feature cache: every embedding computed once, sharded over devices, resumable."""
