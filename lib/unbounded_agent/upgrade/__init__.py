"""AgentUpgrade: blue-green replacement of the agent binary with probation and automatic rollback.

One request, one operation id, one chain of units (units/README.md):

    dispatcher ─► unbounded-upgrade-switch@<id>  (Requires= preflight@<id> ─► stage@<id>)
                      └─► restarts the daemon, starts unbounded-upgrade-probation
                              └─► commit, or unbounded-agent-daemon-recovery (roll back)

- ``record``   the upgrade record (the one source of truth every step reads first and writes before it
               acts), the quarantine and the rollback signal;
- ``api``      what the dispatcher calls: begin an operation, follow it to its end, converge it;
- ``stage``, ``preflight``, ``switch``, ``probation``, ``recovery``: one module per step unit;
- ``resume``   decides an operation that a ``kill -9`` or a host stop interrupted;
- ``units``    the chain's unit names, and which of them are still at work.
"""
