"""On a GPU, a one-process NCCL group: engine.distributed.reduce_in_place with host tensors (NCCL has no CPU
backend), and the sharded loader on a CUDA mesh against the CPU model. Run from the repository root:
python3 docs/bench/nccl_one_process_gpu.py. H200, this session: sums [3.0, 4.0], min 5.0, DTensor, max diff 4.8e-07."""
import os, sys, tempfile, torch, torch.distributed as dist
sys.path[:0] = [".", "tests"]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.cuda.set_device(0)
dist.init_process_group("nccl")
from engine.distributed import reduce_in_place, shard_model
t = torch.tensor([3.0, 4.0]); reduce_in_place(t, "sum"); print("host sum under nccl", t.tolist())
m = torch.tensor([5.0], dtype=torch.float64); reduce_in_place(m, "min"); print("host min", m.item())
from helpers import tiny_model, save_model
from engine.arch import adapter_for
from engine.sharded_load import load_sharded
d = tempfile.mkdtemp()
model = tiny_model(n_layer=4, n_head=4, hidden=64); model.save_pretrained(d, max_shard_size="20KB")
sharded = load_sharded(d, model.config, adapter_for(model.config), torch.float32, torch.device("cuda:0"))
print("sharded param type", type(sharded.transformer.h[0].self_attention.query_key_value.weight).__name__)
ids = torch.randint(0, 100, (2, 16))
with torch.no_grad():
    a = sharded.transformer(input_ids=ids.cuda()).last_hidden_state.cpu()
    b = model.transformer(input_ids=ids).last_hidden_state
print("cuda sharded vs cpu max diff", (a - b).abs().max().item())
dist.destroy_process_group()
