"""torchrun entry of the DDP and FSDP tests: train with the CLI's flags, then save this rank's weights to
$PSGPO_DDP_DUMP/rank{RANK}-{policy,critic}.safetensors for the test to compare. Under `--parallel fsdp`
each rank saves the full weights it gathers from all the shards (so the entry keeps the process group up
after `train` and closes it itself)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as torch_dist
from safetensors.torch import save_file

from trainer.cli_train import parse_dataclass
from trainer.ppo import PPOArgs, train


def main() -> None:
    args = parse_dataclass(PPOArgs, sys.argv[1:], "ddp_entry")
    fsdp = args.parallel == "fsdp"
    if fsdp:
        torch_dist.init_process_group(backend="gloo")
    result = train(args)
    dump, rank = Path(os.environ["PSGPO_DDP_DUMP"]), int(os.environ["RANK"])
    dump.mkdir(parents=True, exist_ok=True)
    for name, model in (("policy", result.policy), ("critic", result.critic)):
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        else:
            weights = model.state_dict()
        # tied embeddings share storage; safetensors wants separate tensors
        state = {k: v.detach().clone().contiguous() for k, v in weights.items()}
        save_file(state, str(dump / f"rank{rank}-{name}.safetensors"))
    if fsdp:
        torch_dist.destroy_process_group()
    print(f"rank {rank} done at step {result.state.step}", flush=True)


if __name__ == "__main__":
    main()
