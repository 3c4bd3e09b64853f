"""Polling with a bound: the one way tests wait for something the system does on its own time.

The bound only stops a hung test; no test asserts how long anything took."""

import time


def wait_until(what: str, fn, timeout: float = 180, poll: float = 0.2):
    """Poll fn until it returns something truthy and return that; fail naming what and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(poll)
    raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s (last: {last!r})")
