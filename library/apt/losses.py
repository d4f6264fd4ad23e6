"""APT's regularisers: representation stabilisation (RS) and attention alignment (AA).

RS: for each recorded self-attention layer, the per-sample, per-channel mean and standard
deviation of its features in the tuned pass are pulled towards those of the reference pass:
L_mu = mean_l MSE(mu_l, sg(mu_l_ref)), L_sigma likewise. (The paper writes squared norms; the mean
over channels is used so that lambda_dist does not depend on the layer width.)

AA: the tuned pass's cross-attention maps (averaged over heads) are pulled towards the reference's:
the squared distance between the two token distributions of each query position (default), their
KL(ref || tuned), or the squared distance of the logits; averaged over positions and layers. Token
positions excluded by `token_mask` (padding after the end of text, a trigger word) do not count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from library.apt.attention import Recorder


def representation_loss(rec: Recorder, tuned: str = "tuned", ref: str = "ref") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_mu, L_sigma) averaged over the recorded layers (zeros when none)."""
    mus, sigmas = [], []
    for layer in rec.layers("features"):
        for (mu_t, sd_t), (mu_r, sd_r) in zip(rec.features[(layer, tuned)], rec.features[(layer, ref)]):
            mus.append(F.mse_loss(mu_t, mu_r.detach()))
            sigmas.append(F.mse_loss(sd_t, sd_r.detach()))
    if not mus:
        zero = torch.zeros(())
        return zero, zero
    return torch.stack(mus).mean(), torch.stack(sigmas).mean()


def attention_loss(rec: Recorder, token_mask: torch.Tensor | None, distance: str, tuned: str = "tuned",
                   ref: str = "ref") -> torch.Tensor:
    """Mean over recorded cross-attention layers of the distance between tuned and reference maps."""
    losses = []
    for layer in rec.layers("maps"):
        a_t, a_r = rec.maps[(layer, tuned)], rec.maps[(layer, ref)].detach()  # (B, N, tokens)
        mask = None if token_mask is None else token_mask.to(a_t.device, a_t.dtype)[:, None, :]
        if distance == "kl":
            # KL(ref || tuned) over the kept tokens, each query's distribution renormalised over them
            p, q = a_r, a_t
            if mask is not None:
                p, q = p * mask, q * mask
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
            q = q / q.sum(-1, keepdim=True).clamp_min(1e-12)
            per = (p * (torch.log(p.clamp_min(1e-12)) - torch.log(q.clamp_min(1e-12)))).sum(-1)
            losses.append(per.mean())
        else:  # "mse" on probabilities, or "logits" (the maps recorded are then logits)
            err = (a_t - a_r) ** 2
            if mask is not None:
                err = err * mask
            losses.append(err.sum(-1).mean())  # squared distance per query position, averaged
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()


def token_mask(input_ids: torch.Tensor, eos_id: int, exclude_padding: bool, exclude_ids: list[int]) -> torch.Tensor:
    """(B, tokens) 1 where a position takes part in attention alignment. `exclude_ids` is the token
    sequence of one word or phrase (a trigger word often splits into several sub-tokens): its
    positions are left out wherever the whole sequence occurs, and nowhere else."""
    mask = torch.ones_like(input_ids, dtype=torch.float32)
    if exclude_padding:
        is_eos = (input_ids == eos_id).int()
        first_eos = torch.where(is_eos.any(1), is_eos.argmax(1), torch.full_like(is_eos[:, 0], input_ids.shape[1] - 1))
        positions = torch.arange(input_ids.shape[1])[None, :]
        mask = mask * (positions <= first_eos[:, None]).float()
    n = len(exclude_ids)
    if n and n <= input_ids.shape[1]:
        windows = input_ids.unfold(1, n, 1)  # (B, tokens - n + 1, n)
        starts = (windows == torch.tensor(exclude_ids, dtype=input_ids.dtype)).all(-1)
        hit = torch.zeros_like(mask, dtype=torch.bool)
        for offset in range(n):
            hit[:, offset:offset + starts.shape[1]] |= starts
        mask = mask * (~hit).float()
    return mask
