"""Helper for test_distributed.py, run under torchrun: train with ZeRO-3 through train_ds's config
loading, then compute logits for a fixed prompt with the live (partitioned) engine model."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
import train_ds  # noqa: E402
from files import load_json  # noqa: E402
from model import ModelConfig  # noqa: E402

model_json, train_json, ds_json, out = sys.argv[1:5]
model_cfg = load_json(model_json, ModelConfig)
args = train.build_parser().parse_args(["-m", model_json, "-t", train_json])
engine = train_ds.deepspeed_engine(train_ds.load_ds_config(ds_json))
_, train_cfg, _ = train.load_configs(args, engine)
model = train.train(model_cfg, train_cfg, engine=engine, quiet=True)
model.eval()
with torch.no_grad():
    logits, _ = model(torch.arange(1, 17).view(1, 16) % model_cfg.vocab_size)  # collective: every rank
if int(os.environ.get("RANK", 0)) == 0:
    torch.save(logits.float(), out)
torch.distributed.barrier()
train.leave_distributed(0)  # torchrun workers end the way train.py's do (see leave_distributed)
