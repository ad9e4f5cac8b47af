"""Attention kernels the model can be asked for (`PanguConfig.attention`, `PanguConfig.decode_attention`)."""
