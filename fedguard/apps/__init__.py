"""The composition roots: the two Flower apps a fedguard deployment runs.

* :mod:`fedguard.apps.silo` (``fedguard.apps.silo:client_app``): the silo agent,
  with the trust layer's statistics wired in. It imports no server code (a test
  checks this), so a silo installs and runs only what it must trust.
* :mod:`fedguard.apps.server` (``fedguard.apps.server:server_app``): the
  consortium's ServerApp, with the trust layer's post-training phase, the signed
  audit log and the model registry wired in.

Nothing is imported here: importing one root never loads the other.
"""
