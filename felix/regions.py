"""Regions (issue #15): a node and its control plane belong to exactly one region.

The region is a name (:func:`felix.names.validate_name`) given with ``felix up
--region ID`` / ``felix control --region ID``. :data:`DEV_REGION` (``local``) is the
default of loopback dev mode only: a node or control plane listening beyond loopback
must name its region, and may not call it ``local``.

What the region decides:

- Tokens: a token carries the region it was issued for (its ``region`` claim). A
  gateway and a control plane refuse a token of another region; one whose region is
  set (anything but :data:`DEV_REGION`) refuses a token *without* the claim too. The
  dev default keeps taking claimless tokens, so ``felix token mint`` without a node
  and older dev flows keep working on loopback (:func:`check_token_region`).
- Metadata: every tenant, namespace, stream and cache records its home region (see
  felix/control/api/resources.py); a resource of another region is refused.
- Feeds: a node refuses to follow a control plane of another region
  (felix/node/control.py).
"""

from __future__ import annotations

from felix.errors import Unauthenticated
from felix.names import validate_name

__all__ = ["DEV_REGION", "check_region_name", "check_token_region", "claims_required"]

#: The region of loopback dev mode (the default of ``--region`` on loopback).
DEV_REGION = "local"


def check_region_name(region: str) -> str:
    """``region`` if it is a valid region name; BadRequest otherwise."""
    return validate_name("region", region)


def claims_required(region: str) -> bool:
    """Whether tokens must carry a region claim: everywhere but the dev default."""
    return region != DEV_REGION


def check_token_region(claim: str | None, region: str, holder: str) -> None:
    """Refuse a token whose ``region`` claim is ``claim`` at ``holder`` (``"this node"``,
    ``"this control plane"``) of ``region``.

    Raises:
        Unauthenticated: the claim names another region, or there is none and
            ``region`` is set explicitly (not :data:`DEV_REGION`).
    """
    if claim is None:
        if claims_required(region):
            raise Unauthenticated(
                f"the token has no region claim: {holder} is region {region!r} and takes "
                f"only tokens issued for it (felix token mint --region {region}, or its "
                "control plane's token exchange)"
            )
        return
    if claim != region:
        raise Unauthenticated(
            f"the token was issued for region {claim!r}; {holder} is region {region!r}"
        )
