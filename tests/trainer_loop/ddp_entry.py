"""torchrun entry of the DDP test: train with the CLI's flags, then save this rank's weights to
$PSGPO_DDP_DUMP/rank{RANK}-{policy,critic}.safetensors for the test to compare."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from trainer.cli_train import parse_dataclass
from trainer.ppo import PPOArgs, train


def main() -> None:
    args = parse_dataclass(PPOArgs, sys.argv[1:], "ddp_entry")
    result = train(args)
    dump, rank = Path(os.environ["PSGPO_DDP_DUMP"]), int(os.environ["RANK"])
    dump.mkdir(parents=True, exist_ok=True)
    for name, model in (("policy", result.policy), ("critic", result.critic)):
        # tied embeddings share storage; safetensors wants separate tensors
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(dump / f"rank{rank}-{name}.safetensors"))
    print(f"rank {rank} done at step {result.state.step}", flush=True)


if __name__ == "__main__":
    main()
