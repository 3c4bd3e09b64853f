"""The operation queue: every host operation (upgrade, rollback, reset) is a request in a spool directory,
run one at a time by the dispatcher under the host-operation lock.

- ``spool``     the requests, the claim, the results and the reset gates on disk (dataclasses);
- ``dispatch``  the dispatcher service that ``unbounded-agent-requests.path`` starts.

The CLI, ``unbounded-upgrade@<url>.service`` and the MachineOperation watcher only submit requests and read
results; they never start operation units themselves.
"""
