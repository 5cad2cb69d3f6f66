"""The Flower message contract between silo and server.

Message types, record and field names, the reply status enum, the request
records both sides build and parse, and the adapters to Flower's runtime. The
silo agent (``client/``) and the server (``server/``) both import this room and
never each other.
"""
