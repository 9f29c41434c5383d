"""Bridges: the only way a tenant's records leave its region (docs/operations.md, "Bridges").

A bridge is a control-plane resource (:class:`felix.control.model.BridgeSpec`); a
runner (:mod:`felix.bridge.runner`, ``felix bridge run``, or the node's ``--bridges``
child) copies its source stream to its target with a checkpoint written only after
the target acknowledged.
"""
