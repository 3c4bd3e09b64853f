"""``unbounded-agent-reset-reload-systemd.service``, reset step 8 (phase 2, after stop-daemon): daemon-reload,
so systemd forgets the removed unit files and overrides."""

from __future__ import annotations

from ...reasons import OpsError
from ..step import Step, unexpected


class ReloadSystemd(Step):
    name, number, phase = "reload-systemd", 8, 2
    title = "reload systemd (daemon-reload)"
    verify_after = False

    def apply(self, ctx, rec):
        try:
            ctx.units().reload()
        except OpsError:
            raise
        except Exception as e:
            raise unexpected(e, "daemon-reload failed") from None
        rec.note("systemd reloaded its units")


STEP = ReloadSystemd()


def main(argv: list[str] | None = None) -> int:
    from ..runner import step_main

    return step_main(STEP, __doc__, argv)
