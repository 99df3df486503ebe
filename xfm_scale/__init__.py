"""xfm_scale: DeepSpeed ZeRO-3 + megatron tensor-parallel pre-training of X-FM."""
