"""The agent's side of the Kubernetes API: MachineOperations in, requests to the queue out, results back as
status and Events.

- ``client``      a few REST calls and a watch over the kubernetes client's authentication, built again when
                  the credentials rotate;
- ``mop``         what an operation asks, and the status and Events the agent writes (pure functions);
- ``events``      Events, aggregated when they repeat and kept on disk until the server has them;
- ``listwatch``   lists and watches this machine's operations;
- ``progress``    the watcher's write-ahead memory of each operation it claimed;
- ``status``      everything written to the server: status, Events, TTL deletions, the Machine annotation;
- ``upgrade_driver``, ``reset_driver``: one operation kind each;
- ``watcher``     the main loop that ties them together.
"""
