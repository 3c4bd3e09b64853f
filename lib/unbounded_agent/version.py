"""The agent's version, stamped at build time into ``_stamp.py`` (see packaging/build_release.py)."""

try:
    from ._stamp import VERSION  # written by the release and package builds
except ImportError:  # running from a source checkout
    VERSION = "0.0.0+dev"
