"""The audit room: signed hash-chained logs, the PKI, the model registry and lineage.

It owns the append-only, hash-chained, signed JSON Lines logs
(:mod:`fedguard.audit.chain`: the record type, canonical JSON, hashing, reading
and verifying; :mod:`fedguard.audit.logs`: the appender and each silo's own log;
:mod:`fedguard.audit.server_log`: the consortium server's audit log), the
consortium's key material (:mod:`fedguard.audit.pki`) and the content-addressed
model registry with its lineage (:mod:`fedguard.audit.registry`).

It imports only :mod:`fedguard.core`; the silo agent and the server both use it.
"""
