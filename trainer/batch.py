"""Trajectories as padded token tensors, and the policy / critic forwards over them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from psgpo.v1.rollout_pb2 import Trajectory

if TYPE_CHECKING:
    pass


# =====================================================================================================
# Trajectories -> padded token batches
# =====================================================================================================


@dataclass
class TokenBatch:
    """Prompts left-padded to one width P, responses right-padded to T: every response starts at column
    P, so one slice of the model's outputs holds all of them (as OpenRLHF's `action_mask` layout)."""

    input_ids: torch.Tensor  # (B, P + T) prompt and response tokens, pad elsewhere
    attention_mask: torch.Tensor  # (B, P + T) 1 on real tokens
    position_ids: torch.Tensor  # (B, P + T) 0.. from each sequence's first real token
    prompt_width: int  # P: column of the first response token
    response_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) bool, True on response tokens
    logp_old: torch.Tensor  # (B, T) raw-policy logprobs recorded at sampling time

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: torch.Tensor | slice) -> TokenBatch:
        return TokenBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.position_ids[index],
            self.prompt_width,
            self.response_ids[index],
            self.mask[index],
            self.logp_old[index],
        )


def make_batch(trajectories: Sequence[Trajectory], pad_id: int, device: torch.device) -> TokenBatch:
    B = len(trajectories)
    P = max(len(t.prompt_token_ids) for t in trajectories)
    T = max(len(t.response_token_ids) for t in trajectories)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)  # (B, P + T)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)  # (B, P + T)
    response_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.bool)  # (B, T)
    logp_old = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
    for b, traj in enumerate(trajectories):
        prompt, response = list(traj.prompt_token_ids), list(traj.response_token_ids)
        p, n = len(prompt), len(response)
        input_ids[b, P - p : P + n] = torch.tensor(prompt + response)
        attention_mask[b, P - p : P + n] = 1
        response_ids[b, :n] = torch.tensor(response)
        mask[b, :n] = True
        logp_old[b, :n] = torch.tensor(list(traj.logprobs), dtype=torch.float32)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + T) left padding: count from 0
    return TokenBatch(
        input_ids.to(device),
        attention_mask.to(device),
        position_ids.to(device),
        P,
        response_ids.to(device),
        mask.to(device),
        logp_old.to(device),
    )


def policy_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Logits predicting each response token, (B, T, V): the outputs at columns P-1 .. P+T-2.
    `logits_to_keep` skips the LM head on the prompt."""
    T = batch.response_ids.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=T + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]  # (B, T, V)


def critic_values(critic: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """V(s_t) for each response token t, (B, T): the critic's output at column P-1+t, the last token of
    the state (prompt + response[:t]) from which token t is chosen (as OpenRLHF's critic)."""
    T = batch.response_ids.shape[1]
    out = critic(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    start = batch.prompt_width - 1
    return out.logits[:, start : start + T, 0].float()  # (B, T)


def in_chunks(batch: TokenBatch, size: int) -> Iterator[TokenBatch]:
    for start in range(0, len(batch), size):
        yield batch.rows(slice(start, start + size))
