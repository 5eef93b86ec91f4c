"""The lazy amateur's policies as `cold bench --cobatch-steps` names them ("always", integers K >= 0)."""

from __future__ import annotations

from cold.sampling.amateur import ALWAYS


def cobatch_kwargs(policy) -> dict:
    """`Engine`'s keyword for a --cobatch-steps policy (an integer or "always"); {} for None: the engine's default."""
    if policy is None:
        return {}
    return {"cobatch_steps": ALWAYS if policy == "always" else int(policy)}
