"""Block-sparse kernels: the BSR format, Pallas matmuls and sparse Flax Dense layers."""

from jaxsparse.kernels.bsr import (BSR, block_mask, bsr_block_mask, bsr_from_dense, bsr_overflow,
                                   bsr_to_dense, bsr_with_data, check_block_shape,
                                   expand_block_mask, is_block_structured)
from jaxsparse.kernels.pallas_matmul import (BACKENDS, Backend, BsrMatmulConfig, KernelConfig,
                                             bsr_matmul, bsr_matmul_reference,
                                             load_tuned_configs, resolve_backend,
                                             save_tuned_configs, tune_bsr_matmul, tuned_configs,
                                             tuning_key)
from jaxsparse.kernels.layers import (KernelPath, SparseDense, SparseLinear, SparseMask,
                                      choose_path, load_masks, sparse_dense)
from jaxsparse.kernels.sharded import (ShardedBSR, sharded_bsr_from_dense, sharded_bsr_matmul,
                                       sharded_bsr_matmul_reference, sharded_bsr_overflow,
                                       sharded_bsr_to_dense, sharded_bsr_with_data)
