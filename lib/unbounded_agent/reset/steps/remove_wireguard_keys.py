"""``unbounded-agent-reset-remove-wireguard-keys.service``, reset step 3: remove /etc/wireguard/server.priv
and server.pub (nothing else there)."""

from __future__ import annotations

from ..step import Step, plan_paths, remove_path

WIREGUARD_KEYS = ("/etc/wireguard/server.priv", "/etc/wireguard/server.pub")


class RemoveWireguardKeys(Step):
    name, number, phase = "remove-wireguard-keys", 3, 1
    title = "remove the WireGuard server keys"

    def plan(self, ctx):
        return plan_paths(ctx, WIREGUARD_KEYS)

    def apply(self, ctx, rec):
        for p in WIREGUARD_KEYS:
            remove_path(ctx, rec, p)


STEP = RemoveWireguardKeys()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
