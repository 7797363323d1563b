"""The client's side of secure aggregation: answer one stage of :mod:`secagg.protocol`.

No Flower here (``client/app.py`` registers the ``query`` handler and converts records):
:func:`secagg_reply` takes the request's ``secagg`` config and byte strings, the state the
previous stage left in this node's Flower ``Context.state`` (one JSON string) and a
``train`` callback, and returns the reply's parts and the new state. The client's secret
keys live in that state only between the messages of one round; it is replaced at the
next round's ``advertise-keys``.

At ``masked-input`` the client trains as a plain round would (data attacks, DP-SGD and
local DP included), then :func:`update_and_weight` turns the trained model into the update
the server would have computed (float64 new minus global weights) and its integer weight,
which the protocol clips, quantises and masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from secagg import Msg, client_step, state_from_json, state_to_json

__all__ = ["secagg_reply", "update_and_weight"]

Train = Callable[[], tuple[NDArray[np.floating], int]]


def update_and_weight(
    global_state: Mapping[str, Tensor], new_state: Mapping[str, Tensor], num_examples: float
) -> tuple[NDArray[np.float64], int]:
    """``(update (d,), weight)``: float64 differences of the floating entries, in order.

    Raises
    ------
    ValueError
        If the example count is not a positive integer (secure aggregation sums integers).
    """
    keys = [k for k, v in global_state.items() if v.is_floating_point()]
    update = torch.cat([
        new_state[k].detach().cpu().to(torch.float64).reshape(-1)
        - global_state[k].detach().cpu().to(torch.float64).reshape(-1)
        for k in keys
    ])
    if num_examples != int(num_examples) or num_examples < 1:
        raise ValueError(f"secure aggregation weights must be positive integers; this client "
                         f"reports num-examples={num_examples!r}")
    return update.numpy(), int(num_examples)


def secagg_reply(
    config: Mapping[str, Any],
    blobs: Mapping[str, bytes],
    saved: str | None,
    *,
    me: int,
    train: Train,
    noise_seed: int | None = None,
) -> tuple[dict[str, Any], dict[str, bytes], Tensor | None, str]:
    """One protocol step: ``(config, blobs, masked vector or None, new saved state)``.

    ``noise_seed`` seeds this client's distributed DP noise (used only when the server's
    parameters ask for it).

    The masked vector is returned as a signed tensor of the same width (``int32`` for
    ``bits <= 32``): same bytes, a dtype every transport carries.
    """
    state = state_from_json(saved) if saved else None
    reply, new_state = client_step(Msg(dict(config), dict(blobs)), state, me=me, train=train,
                                   noise_seed=noise_seed)
    vector = None
    if reply.vector is not None:
        signed = np.int32 if reply.vector.dtype == np.uint32 else np.int64
        vector = torch.from_numpy(reply.vector.view(signed).copy())
    return dict(reply.config), dict(reply.blobs), vector, state_to_json(new_state)
