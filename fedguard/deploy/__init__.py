"""Deploying fedguard: a thin, documented layer over Flower's own commands.

Every deployment command says which Flower command it runs; nothing here speaks a
transport of its own. The walkthrough in ``docs/deployment.md`` runs them in
order. The command line itself (the parsers and the handlers that call this
room) is :mod:`fedguard.cli.deploy`.

=============================  ==============================================================
``fedguard ca init``           make the consortium CA (``cryptography``; :mod:`fedguard.audit.pki`)
``fedguard ca issue-server``   the SuperLink's TLS certificate and Ed25519 audit key
``fedguard ca sign-roster``    the signed SecAgg roster of the silos' identity keys
                               (:mod:`fedguard.deploy.roster`)
``fedguard node keygen``       a silo's SuperNode authentication key (ECDSA P-384, OpenSSH)
                               and its SecAgg identity key (Ed25519)
``fedguard node register``     ``flwr supernode register KEY.pub fedguard``
``fedguard node list``         ``flwr supernode list fedguard``
``fedguard server start``      ``flower-superlink`` with TLS, node authentication,
                               ``--disable-runtime-dependency-installation``, ``--database``
                               (:mod:`fedguard.deploy.superlink`)
``fedguard server stop``       SIGTERM to the PID in ``superlink.pid``
``fedguard client start``      ``flower-supernode`` with the CA, the node key and
                               ``--node-config`` (+ fedguard's warm ClientApp executor;
                               :mod:`fedguard.deploy.supernode`)
``fedguard client stop``       SIGTERM to the PIDs in the state folder
``fedguard client reset-ledger`` a silo's budget afresh, archived and logged
                               (:mod:`fedguard.deploy.ledger_reset`)
``fedguard run CONFIG``        ``flwr run APP fedguard`` with a generated app (the
                               fedguard Server/ClientApps, ``CONFIG``'s options as run config;
                               :mod:`fedguard.deploy.submit`, :mod:`fedguard.deploy.bundles`)
``fedguard audit verify``      :func:`fedguard.audit.server_log.verify_audit_log`
``fedguard models ...``        :class:`fedguard.audit.registry.ModelRegistry`
=============================  ==============================================================

The rest of the room: the server and silo folders (:mod:`fedguard.deploy.layouts`),
background processes, PID files and folder locks (:mod:`fedguard.deploy.supervision`),
Flower's CLI and Control API (:mod:`fedguard.deploy.flower_control`), the run
folder's lock that keeps one ServerApp per run (:mod:`fedguard.deploy.run_lock`)
and the deployed ServerApp's audit log and registry writer
(:mod:`fedguard.deploy.recorder`). The deployed ServerApp itself is wired in the
composition root, :mod:`fedguard.apps`.
"""
