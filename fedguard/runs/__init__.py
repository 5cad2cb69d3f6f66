"""The run folder: its layout, its checkpoints and what a finished run holds.

One owner for the contract between ``fedguard simulate`` (writes), export,
explain, monitor, the attack metrics and the deployed ServerApp (read or append).
"""
