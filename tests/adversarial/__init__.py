"""A malicious consortium server against the real silo agent (issue 12).

``harness.py`` drives :func:`fedguard.client.app.make_client_app` (and the deployed
``app``) with crafted Flower messages, real data, real ledgers and the real
SecAgg+ ``ServerRound``; each ``test_*`` module plays one attack.
"""
