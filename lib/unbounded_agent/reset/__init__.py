"""AgentReset: return a host to its pre-bootstrap state, in ordered, idempotent steps (DESIGN.md §5).

Each step is its own oneshot unit and executable (``unbounded-agent-reset-<step>``), run under the
host-operation lock held by the dispatcher for the whole reset:

- ``steps/``   one module per step: its inventory (plan) and its work (apply);
- ``step``     what the steps share: Context, Item, Recorder, the Step base;
- ``runner``   runs one step for the reset that holds the host and writes its report;
- ``reports``  the run's request, the "resetting" checkpoint and the step reports (dataclasses);
- ``api``      what the dispatcher calls: phase 1, the report gate, phase 2;
- ``dryrun``   every step's plan, changing nothing;
- ``machines``, ``netlinks``, ``routing``, ``treeremove``: the host inventories the steps work from.
"""
