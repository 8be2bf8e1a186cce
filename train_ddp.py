"""
Data-parallel training with PyTorch DDP: the same loop as train.py, one process per device.

    torchrun --standalone --nproc_per_node 2 train_ddp.py -m config/model.json -t config/pretrain.json \\
             --set batch_size=8 grad_accum=2 out_dir=checkpoint/pretrain_ddp

Across machines (run on each, node_rank 0..N-1; the master's address must be reachable):

    torchrun --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 \\
             --nproc_per_node 8 train_ddp.py -m ... -t ...

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; train.train() sees them, joins the process group
(nccl on GPUs, gloo on CPU), wraps the model in DistributedDataParallel and splits each step's
grad_accum micro-batches across the ranks (grad_accum must be a multiple of the world size), so
a run on N processes takes the same optimizer steps on the same data as a run on one. Only rank 0
logs, evaluates and writes checkpoints; --resume works as with train.py. This file exists so the
DDP entry point has a name; the loop lives in train.py alone.
"""

import os
import sys

import train

if __name__ == "__main__":
    if "RANK" not in os.environ:
        print("train_ddp.py runs under torchrun, e.g.: torchrun --standalone --nproc_per_node 2 train_ddp.py "
              "-m config/model.json -t config/pretrain.json --set batch_size=8 grad_accum=2 out_dir=checkpoint/pretrain_ddp "
              "(or use train.py for one process)", file=sys.stderr)
        sys.exit(2)
    train.main()
