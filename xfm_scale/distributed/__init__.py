"""Process groups, the parallel layout, seeding, and the small collectives ranks agree with."""
from xfm_scale.distributed.collectives import (all_ranks_agree, any_rank, collective_device, from_rank_zero,
                                               gather_objects, sum_over_ranks)
from xfm_scale.distributed.groups import (MegatronMPU, ParallelLayout, check_tensor_parallel_size, current_layout,
                                          deepspeed_shm_segment, device, global_rank_table, initialize,
                                          seed_everything, shutdown)

__all__ = ["MegatronMPU", "ParallelLayout", "all_ranks_agree", "any_rank", "check_tensor_parallel_size",
           "collective_device", "current_layout", "deepspeed_shm_segment", "device", "from_rank_zero",
           "gather_objects", "global_rank_table", "initialize", "seed_everything", "shutdown", "sum_over_ranks"]
