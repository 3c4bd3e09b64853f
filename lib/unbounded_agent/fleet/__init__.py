"""The fan-out controller: a MachineOperation with ``machineSelector`` becomes one child operation per matched
Machine, created in waves (canaries first, a bound on children in flight), halting on failure. It runs on a
management host or in a pod, never on the machines it upgrades, and uses none of the host-side packages
(upgrade, reset, queue): only the Kubernetes API.

- ``settings``  the controller's settings (file and command line);
- ``lease``     leader election on a coordination.k8s.io Lease: one instance acts;
- ``informer``  list-and-watch caches of MachineOperations and Machines;
- ``selector``  label selectors matched against Machines;
- ``children``  the children's names, labels, owner reference and the parent's finalizer;
- ``rollout``   the waves, the halt and the parent's status, decided from what the server shows (pure);
- ``writer``    every write, fenced by the Lease and conditional;
- ``controller`` the loop and the program (bin/unbounded-agent-fleet-controller).
"""
