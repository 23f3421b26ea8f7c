"""Parallel mechanisms, one file each: data (bucketed overlapped gradient reduction), tensor,
context, pipeline, zero, offload, recompute. They wrap the model from outside."""
